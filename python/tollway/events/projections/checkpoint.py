"""Checkpoints of projection views in a NATS KV bucket.

A checkpoint is the view's ``dump`` (msgpack), zlib-compressed and split
into chunks small enough for any server's max payload:

- ``<name>``: a JSON manifest ``{"seq", "version", "gen", "chunks", "size"}``
- ``<name>.g<gen>.<i>``: the chunks of generation ``gen`` (random: one writer's own)

Chunks are written first and the manifest last, with compare-and-set on its
revision, so a reader never sees half a checkpoint and two gateways writing
the same projection keep the one that got further (the views are folds of
one stream, so any instance's checkpoint serves all of them).

The event loop pays for the snapshot only: the view's msgpack encoding, taken
at once before any await (msgspec encodes in C, faster than a copy made in
Python would be). Compressing it runs in a thread (zlib lets go of the GIL)
and the writes are awaited, so a large view does not stall requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import zlib
from typing import Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from tollway.events.projections import Projection

log = logging.getLogger("tollway.events")

CHUNK = 512 * 1024


class Manifest(msgspec.Struct):
    seq: int
    version: int
    gen: int
    chunks: int
    size: int
    stream: str = ""  # the stream's creation time: its sequence numbers mean nothing in another


async def save(kv: KeyValue, proj: Projection[Any], *, force: bool = False,
               stream: str = "") -> bool:
    """Write the projection's view; False when a newer checkpoint is already there.

    ``force`` (a rebuild) replaces whatever is stored.
    """
    seq = proj.view.last_seq
    snapshot = proj.dump(proj.view)  # the view moves on while we await below
    current: Manifest | None = None
    revision: int | None = None
    with contextlib.suppress(NotFoundError):
        entry = await kv.get(proj.name)
        if entry.value:
            revision = entry.revision
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                current = msgspec.json.decode(entry.value, type=Manifest)
    if (not force and current is not None and current.version == proj.version
            and (current.stream == stream or not stream or not current.stream)
            and current.seq >= seq):
        return False
    data = await asyncio.to_thread(zlib.compress, snapshot, 1)
    # Random, not current.gen + 1: two gateways (workers of one host, say) saving at once
    # from the same manifest would write the same chunk keys, and the loser's purge would
    # delete the winner's chunks.
    gen = int.from_bytes(os.urandom(6)) or 1
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    for i, chunk in enumerate(chunks):
        await kv.put(f"{proj.name}.g{gen}.{i}", chunk)
    manifest = msgspec.json.encode(
        Manifest(seq=seq, version=proj.version, gen=gen, chunks=len(chunks), size=len(data),
                 stream=stream))
    try:
        if revision is None:
            await kv.create(proj.name, manifest)
        else:
            await kv.update(proj.name, manifest, last=revision)
    except KeyWrongLastSequenceError:
        # Another gateway checkpointed meanwhile: drop our chunks, keep theirs.
        await _purge(kv, proj.name, gen, len(chunks))
        return False
    if current is not None:
        await _purge(kv, proj.name, current.gen, current.chunks)
    return True


async def _purge(kv: KeyValue, name: str, gen: int, chunks: int) -> None:
    for i in range(chunks):
        with contextlib.suppress(Exception):
            await kv.purge(f"{name}.g{gen}.{i}")


async def load(kv: KeyValue, proj: Projection[Any]) -> Manifest | None:
    """Replace the view with the stored checkpoint; None (view untouched) if none fits."""
    try:
        entry = await kv.get(proj.name)
    except NotFoundError:
        return None
    if not entry.value:
        return None
    try:
        m = msgspec.json.decode(entry.value, type=Manifest)
        if m.version != proj.version:
            log.info("checkpoint of %s is version %d, the fold is %d: rebuilding from the "
                     "stream", proj.name, m.version, proj.version)
            return None
        parts = [(await kv.get(f"{proj.name}.g{m.gen}.{i}")).value or b""
                 for i in range(m.chunks)]
        data = b"".join(parts)
        if len(data) != m.size:
            raise ValueError(f"size {len(data)} != {m.size}")
        view = proj.load(zlib.decompress(data))
    except Exception as exc:  # a bad checkpoint costs a rebuild, never the start
        log.warning("checkpoint of %s unusable (%s): rebuilding from the stream", proj.name, exc)
        return None
    proj.view = view
    return m
