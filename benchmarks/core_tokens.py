"""Token counting: ``tollway.count_tokens`` against tiktoken's ``encode_ordinary``.

Both count the same texts (about 1 KB, 4 KB and 100 KB of mixed English
prose, Python code and JSON request bodies) with both encodings. tiktoken is
built offline from the bytes tollway embeds (``_core.encoding_file``) and
tiktoken_ext's own pattern, so they do the same work on the same vocabulary.
Each round times both back to back (alternating which goes first); the
summary is the median throughput of each and the median per-round ratio.

    python benchmarks/core_tokens.py [--rounds 7]

``run()`` returns the summary as a dict; ``benchmarks/core.py`` calls it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken_ext.openai_public as openai_public

import tollway
from tollway import _core

ENCODINGS = ("o200k_base", "cl100k_base")
SIZES = {"1KB": 1_024, "4KB": 4_096, "100KB": 102_400}
# Each timing covers at least this many bytes, so timer noise stays small.
BYTES_PER_TIMING = 2_000_000
ACCEPTANCE_RATIO_4KB = 1.5

_PROSE = [
    "The gateway sits between every service and the model providers it calls.",
    "It picks a model by policy, guards the call with rate limits and budgets, and records it.",
    "When a provider fails, the breaker opens and traffic moves to the next candidate.",
    "Costs are estimated before the call and settled afterwards from the provider's usage.",
    "We don't want a slow tokenizer on the hot path; it's measured in microseconds per request.",
    "Operators read usage by day, model and provider, and they'll see spend as it happens.",
    "A tenant's daily budget counts the projected spend plus every open reservation.",
    "Streaming responses are counted as they arrive, even if the client hangs up early.",
]
_CODE = [
    "def estimate(request: dict[str, Any]) -> Estimate:\n"
    '    messages = request.get("messages", [])\n'
    '    tokens = sum(count_tokens(m["content"]) for m in messages)\n'
    '    return Estimate(tokens, request.get("max_tokens", 1024), 0)\n',
    "for attempt in range(3):\n"
    "    try:\n"
    "        response = await client.post(url, json=body, timeout=30.0)\n"
    "        break\n"
    "    except httpx.ConnectError as exc:\n"
    "        await asyncio.sleep(min(8.0, 0.25 * 2**attempt) * random.random())\n",
    "class Breaker:\n"
    "    def __init__(self, threshold: int = 5, window: float = 60.0) -> None:\n"
    "        self.failures: deque[float] = deque()\n"
    "        self.threshold, self.window = threshold, window\n",
]


def _json_body(rng: random.Random) -> str:
    body = {
        "model": rng.choice(["gpt-4o-mini", "openai/gpt-4.1", "auto"]),
        "messages": [
            {"role": "system", "content": rng.choice(_PROSE)},
            {"role": "user", "content": " ".join(rng.sample(_PROSE, 2))},
        ],
        "max_tokens": rng.randrange(16, 2048),
        "temperature": round(rng.random(), 2),
        "user": f"tenant-{rng.randrange(1000):03d}",
    }
    return json.dumps(body, indent=rng.choice([None, 2])) + "\n"


def make_texts(seed: int = 20250801) -> dict[str, str]:
    """The benchmark texts: prefixes of one deterministic ~100 KB document."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < max(SIZES.values()):
        kind = rng.random()
        if kind < 0.5:
            part = " ".join(rng.choice(_PROSE) for _ in range(rng.randrange(2, 6))) + "\n\n"
        elif kind < 0.8:
            part = rng.choice(_CODE) + "\n"
        else:
            part = _json_body(rng)
        parts.append(part)
        size += len(part.encode())
    document = "".join(parts)
    return {label: document.encode()[:n].decode("utf-8", "ignore") for label, n in SIZES.items()}


def offline_tiktoken(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding from tollway's embedded bytes; nothing is downloaded."""
    data = _core.encoding_file(name)

    def load_tiktoken_bpe(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if hashlib.sha256(data).hexdigest() != expected_hash:
            raise RuntimeError(f"embedded {name} does not match tiktoken_ext's sha256")
        return {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }

    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = load_tiktoken_bpe
    try:
        spec: dict[str, Any] = getattr(openai_public, name)()
    finally:
        openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(
        name=f"{name}-offline",
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )


def _throughput(fn: Callable[[], object], nbytes: int, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return nbytes * calls / (time.perf_counter() - start) / 1e6


def run(rounds: int = 7) -> dict[str, Any]:
    """Median throughput (MB/s) of both counters and their ratio, per encoding and size."""
    texts = make_texts()
    results: list[dict[str, Any]] = []
    for name in ENCODINGS:
        reference = offline_tiktoken(name)
        for label, text in texts.items():
            want = len(reference.encode_ordinary(text))
            got = tollway.count_tokens(text, name)
            if got != want:
                raise AssertionError(f"{name} {label}: tollway counts {got}, tiktoken {want}")
            nbytes = len(text.encode())
            calls = max(1, BYTES_PER_TIMING // nbytes)

            def ours(text: str = text, name: str = name) -> object:
                return tollway.count_tokens(text, name)

            def theirs(text: str = text, ref: tiktoken.Encoding = reference) -> object:
                return ref.encode_ordinary(text)

            fast: list[float] = []
            base: list[float] = []
            for r in range(rounds):
                order: list[tuple[Callable[[], object], list[float]]] = [
                    (ours, fast),
                    (theirs, base),
                ]
                for fn, out in order if r % 2 == 0 else order[::-1]:
                    out.append(_throughput(fn, nbytes, calls))
            results.append(
                {
                    "encoding": name,
                    "size": label,
                    "bytes": nbytes,
                    "tokens": want,
                    "tollway_mb_s": round(statistics.median(fast), 2),
                    "tiktoken_mb_s": round(statistics.median(base), 2),
                    "ratio": round(
                        statistics.median(f / b for f, b in zip(fast, base, strict=True)), 2
                    ),
                }
            )
    ratios_4kb = [r["ratio"] for r in results if r["size"] == "4KB"]
    return {
        "benchmark": "core_tokens",
        "rounds": rounds,
        "tiktoken": tiktoken.__version__,
        "results": results,
        "acceptance": {
            "bar": f"tollway >= {ACCEPTANCE_RATIO_4KB}x tiktoken encode_ordinary on 4 KB",
            "min_ratio_4kb": min(ratios_4kb),
            "pass": min(ratios_4kb) >= ACCEPTANCE_RATIO_4KB,
        },
    }


def _table(summary: dict[str, Any]) -> str:
    lines = [
        "| encoding | size | tokens | tollway MB/s | tiktoken MB/s | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['encoding']} | {r['size']} | {r['tokens']} | {r['tollway_mb_s']} "
            f"| {r['tiktoken_mb_s']} | {r['ratio']}x |"
        )
    acceptance = summary["acceptance"]
    verdict = "PASS" if acceptance["pass"] else "FAIL"
    lines.append(f"\n{verdict}: {acceptance['bar']} (min {acceptance['min_ratio_4kb']}x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    summary = run(rounds=args.rounds)
    print(_table(summary))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(__file__).resolve().parent / "results" / f"core_tokens-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    record = {"machine": platform.platform(), "python": platform.python_version(), **summary}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten to {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
