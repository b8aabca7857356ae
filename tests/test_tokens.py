"""The token counter's Python API: counts, encodings, chat prompts, the GIL."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import pytest

import tollway
from tollway import tokens
from tollway.tokens import (
    count_chat_tokens,
    count_tokens,
    encode_ordinary,
    encoding_file,
    encoding_for_model,
)


def test_count_tokens_is_reexported_from_the_package() -> None:
    assert tollway.count_tokens is tokens.count_tokens
    assert tollway.count_tokens("hello world") == 2


def test_known_ids() -> None:
    assert encode_ordinary("hello world", "cl100k_base") == [15339, 1917]
    assert encode_ordinary("hello world", "o200k_base") == [24912, 2375]
    assert encode_ordinary("hello world") == [24912, 2375]
    assert count_tokens("", "cl100k_base") == 0


def test_special_tokens_are_ordinary_text() -> None:
    # encode_ordinary never emits special tokens: <|endoftext|> is plain text.
    assert 100257 not in encode_ordinary("<|endoftext|>", "cl100k_base")
    assert count_tokens("<|endoftext|>", "cl100k_base") > 1


def test_unknown_encoding_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="p50k_base"):
        count_tokens("x", "p50k_base")
    with pytest.raises(ValueError):
        encoding_file("gpt2")


def test_non_str_text_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        count_tokens(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "size", "sha256"),
    [
        (
            "cl100k_base",
            1_681_126,
            "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        ),
        (
            "o200k_base",
            3_613_922,
            "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        ),
    ],
)
def test_encoding_files_are_embedded(name: str, size: int, sha256: str) -> None:
    data = encoding_file(name)
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha256


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-5-nano", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("openai/gpt-4o-mini", "o200k_base"),
        ("openai/gpt-3.5-turbo", "cl100k_base"),
        ("anthropic/claude-3.5-sonnet", "o200k_base"),
        ("some-local-model", "o200k_base"),
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert encoding_for_model(model) == encoding


# OpenAI cookbook's example conversation for num_tokens_from_messages.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates "
        "corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]


def test_chat_count_matches_the_cookbook() -> None:
    # The cookbook prints 124 for gpt-4o / gpt-4o-mini and 129 for gpt-4 /
    # gpt-3.5-turbo, which OpenAI's API reports as prompt_tokens.
    assert count_chat_tokens(COOKBOOK_MESSAGES, "gpt-4o") == 124
    assert count_chat_tokens(COOKBOOK_MESSAGES, "gpt-4o-mini") == 124
    assert count_chat_tokens(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert count_chat_tokens(COOKBOOK_MESSAGES, "gpt-3.5-turbo") == 129


def _by_hand(strings: list[str], fixed: int, encoding: str = "o200k_base") -> int:
    return sum(count_tokens(s, encoding) for s in strings) + fixed


def test_content_parts_and_images() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these images?"},
                {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            ],
        }
    ]
    want = _by_hand(["user", "What is in these images?"], 3 + 85 + 765 + 3)
    assert count_chat_tokens(messages, "gpt-4o") == want


def test_tool_calls_and_tool_results() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    strings = ["assistant", "get_weather", '{"city": "Paris"}', "tool", "call_1", '{"temp": 21}']
    want = _by_hand(strings, 3 + 3 + 3 + 3)
    assert count_chat_tokens(messages, "gpt-4o") == want


def test_tools_follow_the_cookbook_formula() -> None:
    messages = [{"role": "user", "content": "What's the weather like in San Francisco?"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_current_weather",
                "description": "Get the current weather in a given location.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "location": {
                            "type": "string",
                            "description": "The city and state, e.g. San Francisco, CA",
                        },
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["location"],
                },
            },
        }
    ]
    base = count_chat_tokens(messages, "gpt-4o")
    lines = [
        "get_current_weather:Get the current weather in a given location",
        "location:string:The city and state, e.g. San Francisco, CA",
        "unit:string:",
        "celsius",
        "fahrenheit",
    ]
    # func_init 7, prop_init 3, 2 x prop_key 3, enum_init -3, 2 x enum_item 3, func_end 12.
    assert count_chat_tokens(messages, "gpt-4o", tools) == base + _by_hand(
        lines, 7 + 3 + 6 - 3 + 6 + 12
    )
    # cl100k models start each function with 10.
    base_cl = count_chat_tokens(messages, "gpt-4")
    with_tools = count_chat_tokens(messages, "gpt-4", tools)
    assert with_tools == base_cl + _by_hand(lines, 10 + 3 + 6 - 3 + 6 + 12, "cl100k_base")


def test_legacy_function_call_counts_like_a_tool_call() -> None:
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    legacy = [{"role": "assistant", "content": None, "function_call": call}]
    tool_call = {"id": "call_1", "type": "function", "function": call}
    modern = [{"role": "assistant", "content": None, "tool_calls": [tool_call]}]
    assert count_chat_tokens(legacy, "gpt-4o") == count_chat_tokens(modern, "gpt-4o")
    assert count_chat_tokens(legacy, "gpt-4o") > count_chat_tokens(legacy[:0], "gpt-4o") + 3


def test_bare_functions_count_like_tools() -> None:
    messages = [{"role": "user", "content": "hi"}]
    function = {
        "name": "lookup",
        "description": "Looks a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    }
    wrapped = [{"type": "function", "function": function}]
    bare = count_chat_tokens(messages, "gpt-4o", [function])
    assert bare == count_chat_tokens(messages, "gpt-4o", wrapped)
    assert bare > count_chat_tokens(messages, "gpt-4o")


def test_bad_messages_are_type_errors() -> None:
    with pytest.raises(TypeError):
        count_chat_tokens("hello", "gpt-4o")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        count_chat_tokens(["hello"], "gpt-4o")  # type: ignore[list-item]


def test_counts_agree_across_threads() -> None:
    texts = [f"thread text {i} " * (50 + i) for i in range(8)]
    want = [count_tokens(t) for t in texts]
    results: dict[int, list[int]] = {}

    def work(k: int) -> None:
        results[k] = [count_tokens(t) for t in texts for _ in range(20)][::20]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == want for r in results.values())


def test_large_texts_are_counted_without_the_gil() -> None:
    big = "The gateway counts tokens while other requests run. 1234\n" * 200_000
    count_tokens(big[:100])  # parse the vocabulary first
    expected = count_tokens(big)

    inside = threading.Event()
    done = threading.Event()
    got: list[int] = []

    def count() -> None:
        inside.set()
        got.append(count_tokens(big))
        done.set()

    worker = threading.Thread(target=count)
    worker.start()
    inside.wait()
    # Counting 11 MB takes the worker a good fraction of a second. With the GIL held
    # for all of it, this thread could not run a single Python step until it ended;
    # released, it keeps stepping the whole time. Counted in steps, not seconds.
    steps = 0
    while not done.is_set():
        steps += 1
    worker.join()
    assert got == [expected]
    assert steps > 10_000, steps
