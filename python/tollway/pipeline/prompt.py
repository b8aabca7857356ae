"""A call's prompt tokens: counted once per encoding, and in a thread when the prompt is large.

The policy counts the prompt to bound the call's cost; settle needs the count
again when the provider sends no usage, and so does a shadow call of it. All
read :func:`prompt_tokens`, which keeps the count on the call
(:attr:`Call.prompt_counts`, handed on to the shadow's copy), so a prompt is
tokenized once per encoding whatever asks.

Tokenizing prose costs about 40 ns a byte (a 4 MB prompt: 150-250 ms of
CPU); on the event loop every other call waits that long.
:func:`count_in_thread` counts a body of :data:`THREAD_MIN_BYTES` or more in a
worker thread before anyone asks, and the Rust counter lets go of the GIL
while it counts (for 8 KiB of text or more), so the loop keeps serving. The
threshold is where the thread pays: a round trip through ``asyncio.to_thread``
costs about 70 us, what counting 8 KiB costs; at 32 KiB counting takes 3-5
times that. What stays on the GIL is decoding the JSON body to read the
messages (msgspec, about 6 ns a byte). ``benchmarks/big_prompts.py`` measures
all of it, and the latency of small calls while another tenant sends 4 MB
prompts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from typing import Any, Protocol

from tollway.pipeline.decode import EmbeddingsRequest
from tollway.pipeline.usage import count_input, count_prompt, encoding_of
from tollway.tokens import CoreError

__all__ = ["THREAD_MIN_BYTES", "Prompted", "count_in_thread", "prompt_bound", "prompt_tokens"]

log = logging.getLogger("tollway.pipeline")

# Request bodies this large are counted off the loop. The environment variable exists for
# the benchmark's baseline (a huge value counts everything on the loop).
THREAD_MIN_BYTES = int(os.environ.get("TOLLWAY_COUNT_THREAD_MIN_BYTES", 32 * 1024))

_UNCOUNTABLE = -1


class Prompted(Protocol):
    """A call (or the shadow's copy of one): its body, decoded request and counts so far."""

    body: bytes
    request: Any
    prompt_counts: dict[str, int]  # encoding -> tokens, or -1 when uncountable


def prompt_tokens(call: Prompted, upstream: str) -> int | None:
    """Prompt tokens of the call for the upstream model's encoding, counted on first use.

    None when the counter cannot read the prompt (a shape it does not know; logged). A
    panic in the counter raises :class:`CoreError`: a bug, which fails the call.
    """
    encoding = encoding_of(upstream)
    counts = call.prompt_counts
    tokens = counts.get(encoding)
    if tokens is None:
        tokens = counts[encoding] = _count(call, upstream)
    return None if tokens == _UNCOUNTABLE else tokens


def prompt_bound(call: Prompted, upstream: str) -> int:
    """:func:`prompt_tokens` for a cost bound: a prompt the counter cannot read is
    overestimated from its size (about 2 bytes a token) rather than passed as free."""
    tokens = prompt_tokens(call, upstream)
    return len(call.body) // 2 + 1 if tokens is None else tokens


async def count_in_thread(call: Prompted, upstreams: Iterable[str]) -> None:
    """Count a large prompt for each encoding of ``upstreams`` in a worker thread, so
    :func:`prompt_tokens` finds the counts; a small prompt is left to be counted on use."""
    if len(call.body) < THREAD_MIN_BYTES:
        return
    todo: dict[str, str] = {}
    for upstream in upstreams:
        encoding = encoding_of(upstream)
        if encoding not in call.prompt_counts:
            todo.setdefault(encoding, upstream)
    if todo:
        # The thread sets whole items of the dict; two tasks asking at once (shadow calls
        # of one prompt) may both count an encoding, and store the same number.
        await asyncio.to_thread(_count_all, call, todo)


def _count_all(call: Prompted, todo: dict[str, str]) -> None:
    for encoding, upstream in todo.items():
        call.prompt_counts[encoding] = _count(call, upstream)


def _count(call: Prompted, upstream: str) -> int:
    req = call.request
    try:
        if isinstance(req, EmbeddingsRequest):
            return count_input(req.input, upstream)
        own = getattr(req, "count_prompt", None)  # a surface's own prompt shape
        if own is not None:
            return int(own(upstream))
        return count_prompt(call.body, upstream)
    except CoreError:
        raise
    except Exception:
        # The body decoded as a request, so this is a shape the counter does not know.
        log.warning("prompt not countable", exc_info=True)
        return _UNCOUNTABLE
