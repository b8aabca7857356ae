"""tollway's token counts against the real tiktoken, loaded offline.

tiktoken is built from the very bytes tollway embeds (``encoding_file``) and
from tiktoken_ext's own definitions (pattern, special tokens): its loader is
replaced by one that checks the expected sha256 and returns those bytes'
ranks, so nothing can be downloaded.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public
from hypothesis import given, settings
from hypothesis import strategies as st

import tollway
from tollway.tokens import ENCODINGS, count_tokens, encode_ordinary, encoding_file

REPO = Path(__file__).resolve().parent.parent


def _offline_encoding(name: str) -> tiktoken.Encoding:
    data = encoding_file(name)
    loaded: list[str] = []

    def load_tiktoken_bpe(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        assert hashlib.sha256(data).hexdigest() == expected_hash, blobpath
        loaded.append(blobpath)
        return {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openai_public, "load_tiktoken_bpe", load_tiktoken_bpe)
        spec: dict[str, Any] = getattr(openai_public, name)()
    assert len(loaded) == 1
    return tiktoken.Encoding(
        name=f"{name}-offline",
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )


_REFERENCE: dict[str, tiktoken.Encoding] = {}


def _ref(name: str) -> tiktoken.Encoding:
    # Built once per session and shared (hypothesis tests take no fixtures).
    if name not in _REFERENCE:
        _REFERENCE[name] = _offline_encoding(name)
    return _REFERENCE[name]


def _check(text: str, name: str) -> None:
    want = _ref(name).encode_ordinary(text)
    assert encode_ordinary(text, name) == want, (name, text)
    assert count_tokens(text, name) == len(want), (name, text)


CORPUS = [
    "",
    "The quick brown fox jumps over the lazy dog. It's 9:45 and I've got 3 cups.",
    "I'M they'Ve WE'LL she'D it'S you'RE don'T 'tis 'S 'm rock'n'roll O'Neil's",
    "x'\u017f '\u017fa don'\u017ft they'\u017fve",
    "def count(text: str) -> int:\n    return len(text.split())  # naive\n\n\nclass A:\n\tpass\n",
    'fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!("{v:?}");\n}\n',
    '{"id": "chatcmpl-123", "choices": [{"index": 0, "message": {"role": "assistant"}}],'
    ' "usage": {"prompt_tokens": 9, "completion_tokens": 12}}',
    # Japanese, Chinese
    "\u4eca\u65e5\u306f\u826f\u3044\u5929\u6c17\u3067\u3059\u306d\u3002"
    "\u6211\u4eec\u53bb\u516c\u56ed\u5427\uff01",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4.",
    # Arabic with harakat (marks)
    "\u0627\u0644\u0633\u0651\u064e\u0644\u0627\u0645\u064f "
    "\u0639\u064e\u0644\u064e\u064a\u0652\u0643\u064f\u0645\u0652",
    # Hindi
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e! "
    "\u0939\u093f\u0928\u094d\u0926\u0940",
    # Cyrillic
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u041c\u0418\u0420! "
    "\u0401\u043b\u043a\u0430 \u0438 \u0451\u0436",
    # Hebrew, Thai, Greek
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd "
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 \u0391\u03b8\u03ae\u03bd\u03b1",
    # emoji, ZWJ sequences, skin tones, flags
    "\U0001f600\U0001f469\u200d\U0001f4bb \U0001f3f3\ufe0f\u200d\U0001f308 \U0001f44d\U0001f3fd"
    " \U0001f1fa\U0001f1f8 \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "e\u0301 E\u0301X \u0301ABC .\u0301x a\u0308\u0323 Z\u0351\u0352\u0353 \u0301",
    "HELLOworld helloWorld HTTPServer iPhone \u01c5a \u02b0A a\u02b0B ABC'S",
    "  \t\n\r\n \x0b\x0cx \u00a0y\u2003z\u3000w\u0085v\u2028u",
    "trailing   ",
    "\n  ",
    "a\n  ",
    "!!!\n\n\nabc ;;\r\n\r\n ;;/\n/x //comment",
    "0123456789 1,234,567.89 3.14159265358979 12345678901234567890",
    # Unicode numbers: Arabic-Indic, Roman, superscript, fraction, fullwidth, Devanagari
    "\u0661\u0662\u0663\u0664 \u216b\u216c x\u00b2 \u00bd "
    "\uff11\uff12\uff13 \u0967\u0968\u0969 \u2460\u2461",
    "a" * 10_000,
    " " * 5_000,
    "\n" * 1_000,
    "ab" * 2_000,
    "9" * 3_001,
    "\u4e2d" * 2_000,
    "\U0001f600" * 500,
]


def _repo_texts() -> Iterator[str]:
    for path in sorted((REPO / "python" / "tollway").glob("*.py")):
        yield path.read_text("utf-8")
    yield (REPO / "rust_core" / "src" / "tokenizer" / "pretokenize.rs").read_text("utf-8")


@pytest.mark.parametrize("name", ENCODINGS)
def test_reference_is_the_published_file(name: str) -> None:
    data = encoding_file(name)
    want = {
        "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    }[name]
    assert hashlib.sha256(data).hexdigest() == want
    assert _ref(name).n_vocab > 100_000


@pytest.mark.parametrize("name", ENCODINGS)
def test_corpus(name: str) -> None:
    for text in CORPUS:
        _check(text, name)


@pytest.mark.parametrize("name", ENCODINGS)
def test_repository_sources(name: str) -> None:
    for text in _repo_texts():
        _check(text, name)


@pytest.mark.parametrize("name", ENCODINGS)
def test_lone_surrogates_are_replaced_like_tiktoken(name: str) -> None:
    for text in ["\ud800", "a\ud83d\ude00b", "x\udfff y\ud800\ud800", "\ud83d"]:
        _check(text, name)


def test_count_tokens_defaults_to_o200k() -> None:
    text = "Grüße aus Köln, 12345!"
    assert tollway.count_tokens(text) == len(_ref("o200k_base").encode_ordinary(text))


# Characters that decide which alternative of the patterns matches.
_TRICKY = [
    *" \t\n\r\x0b\x0c\xa0\u2003\u3000\x85\u2028'\u2019\"/.,!?-_#09sStTdDmMlLvVeErR",
    "\u017f",  # folds to s in the case-insensitive contractions
    "\u0301",  # combining acute (Mn)
    "\u093f",  # Devanagari vowel sign (Mc)
    "\u20dd",  # enclosing circle (Me)
    "\u01c5",  # titlecase (Lt)
    "\u02b0",  # modifier letter (Lm)
    "\u4e2d",  # CJK (Lo)
    "\u200d",  # zero-width joiner (Cf)
    "\ufe0f",  # variation selector (Mn)
    "\U0001f600",
    "\u0661",  # Arabic-Indic digit (Nd)
    "\u216b",  # Roman numeral (Nl)
    "\u00b2",  # superscript two (No)
]
_CONTRACTIONS = ["'s", "'S", "'t", "'T", "'re", "'RE", "'rE", "'ve", "'Ve", "'VE", "'m", "'M"]
_CONTRACTIONS += ["'ll", "'LL", "'lL", "'d", "'D", "'\u017f", "\r\n", "  ", "\n\n", " \n"]

_atom = st.one_of(
    st.sampled_from(_TRICKY),
    st.sampled_from(_CONTRACTIONS),
    st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo"]),
    st.characters(categories=["Mn", "Mc", "Me"]),
    st.characters(categories=["Nd", "Nl", "No"]),
    st.characters(categories=["Zs", "Zl", "Zp", "Cc"]),
    st.characters(categories=["P", "S", "Cf", "Cn"]),
    st.characters(exclude_categories=["Cs"]),
)
_run = st.tuples(_atom, st.integers(min_value=1, max_value=12)).map(lambda t: t[0] * t[1])
_texts = st.lists(st.one_of(_atom, _atom, _run), max_size=40).map("".join)


@settings(max_examples=1000, deadline=None)
@given(text=_texts)
def test_generated_texts_cl100k(text: str) -> None:
    _check(text, "cl100k_base")


@settings(max_examples=1000, deadline=None)
@given(text=_texts)
def test_generated_texts_o200k(text: str) -> None:
    _check(text, "o200k_base")
