"""How far a candidate's answer agrees with the primary's: a score in [0, 1].

The rule, in order (the first that applies decides; ``method`` names it):

1. ``tool_calls`` -- either side finished with ``tool_calls``: both outputs
   are read as a sequence of calls (function name, then its JSON arguments).
   Each position scores 1 when name and canonical arguments are equal, 0.5
   when only the name is, 0 otherwise; the score is the mean over the longer
   sequence (a side that is not a tool call at all scores 0).
2. ``json`` -- either side is a JSON object or array (after stripping a
   Markdown code fence): 1 when both are and are equal once canonicalised
   (keys sorted, insignificant whitespace dropped, numbers compared as
   numbers), else 0.
3. ``empty`` -- both sides are empty after normalisation: 1.
4. ``exact`` -- both sides are short answers (at most :data:`SHORT_WORDS`
   words after normalisation: Unicode NFKC, lower case, runs of whitespace
   as one space, surrounding punctuation stripped): 1 when equal, else 0.
   Labels, numbers, yes/no, names.
5. ``similarity`` -- longer text: the mean of the Dice coefficients of the
   two word multisets and of the two word-bigram multisets (words are
   ``\\w+`` runs of the normalised text). Unigrams reward the same content,
   bigrams the same phrasing and order; 1 for identical text, 0 for texts
   sharing no word.

Why not ``difflib``: its ratio is quadratic in the worst case and the
comparison runs on the event loop that serves live calls; these counts are
linear, and inputs are capped at :data:`MAX_WORDS` words.

The primary side of a streamed call is its relayed text (content, then the
name and arguments of each tool call, as the stream sent them), so both sides
are compared in that flattened form.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections import Counter
from typing import Any

__all__ = ["MAX_WORDS", "SHORT_WORDS", "Score", "score"]

SHORT_WORDS = 8
MAX_WORDS = 20_000
_MAX_CHARS = 400_000

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.S)
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_PUNCT = "\"'`.,;:!?()[]{}<>*_-"
_decoder = json.JSONDecoder()


class Score:
    __slots__ = ("method", "value")

    def __init__(self, value: float, method: str) -> None:
        self.value = value
        self.method = method

    def __repr__(self) -> str:
        return f"Score({self.value:.4f}, {self.method!r})"


def score(primary: str, candidate: str, primary_finish: str = "",
          candidate_finish: str = "") -> Score:
    primary, candidate = primary[:_MAX_CHARS], candidate[:_MAX_CHARS]
    if primary_finish == "tool_calls" or candidate_finish == "tool_calls":
        return Score(_tool_calls(primary, candidate), "tool_calls")
    a, b = _as_json(primary), _as_json(candidate)
    if a is not _NOT_JSON or b is not _NOT_JSON:
        same = a is not _NOT_JSON and b is not _NOT_JSON and _canonical(a) == _canonical(b)
        return Score(1.0 if same else 0.0, "json")
    na, nb = normalise(primary), normalise(candidate)
    if not na and not nb:
        return Score(1.0, "empty")
    if len(na.split()) <= SHORT_WORDS and len(nb.split()) <= SHORT_WORDS:
        return Score(1.0 if na.strip(_PUNCT) == nb.strip(_PUNCT) else 0.0, "exact")
    return Score(similarity(na, nb), "similarity")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def similarity(a: str, b: str) -> float:
    """Mean Dice coefficient of word and word-bigram multisets (inputs already normalised)."""
    wa, wb = _WORD.findall(a)[:MAX_WORDS], _WORD.findall(b)[:MAX_WORDS]
    if not wa or not wb:
        return 1.0 if wa == wb else 0.0
    uni = _dice(Counter(wa), Counter(wb), len(wa) + len(wb))
    if len(wa) < 2 or len(wb) < 2:
        return uni
    bi = _dice(Counter(itertools.pairwise(wa)), Counter(itertools.pairwise(wb)),
               len(wa) + len(wb) - 2)
    return (uni + bi) / 2


def _dice(ca: Counter[Any], cb: Counter[Any], total: int) -> float:
    if len(ca) > len(cb):
        ca, cb = cb, ca
    overlap = sum(min(n, cb[k]) for k, n in ca.items() if k in cb)
    return 2.0 * overlap / total if total else 1.0


# ---- JSON ------------------------------------------------------------------------------------
_NOT_JSON: Any = object()


def _as_json(text: str) -> Any:
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    if not s or s[0] not in "{[":
        return _NOT_JSON
    try:
        return json.loads(s)
    except ValueError:
        return _NOT_JSON


def _canonical(value: Any) -> str:
    # Numbers as floats: 1 and 1.0 are the same answer.
    return json.dumps(_numbers(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _numbers(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


# ---- tool calls ------------------------------------------------------------------------------
def tool_calls(text: str) -> list[tuple[str, str]] | None:
    """``name{args}name{args}...`` as (name, canonical args), or None when it is not that."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        m = _NAME.match(text, i)
        if m is None:
            return None
        i = m.end()
        try:
            args, end = _decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append((m.group(0), _canonical(args)))
        i = end
    return out or None


def _tool_calls(a: str, b: str) -> float:
    ca, cb = tool_calls(a), tool_calls(b)
    if ca is None or cb is None:
        return 1.0 if ca is None and cb is None and normalise(a) == normalise(b) else 0.0
    total = 0.0
    for (na, aa), (nb, ab) in zip(ca, cb, strict=False):
        if na == nb:
            total += 1.0 if aa == ab else 0.5
    return total / max(len(ca), len(cb))
