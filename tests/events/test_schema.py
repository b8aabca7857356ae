"""The event contract: schema files in sync, codecs, subjects, records -> events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from tollway.events import schema
from tollway.events.schema import (
    CallCompleted,
    CallFailed,
    CallRejected,
    decode,
    encode,
    encode_record,
    event_from_record,
    subject_token,
)
from tollway.events.synthetic import FIXTURE_CALLS, default_fixture, fixture_bytes
from tollway.events.synthetic import events as synthetic_events

from .helpers import make_record

REPO = Path(__file__).resolve().parents[2]


def test_schema_files_match_the_structs() -> None:
    stale = schema.drifted(REPO / "events" / "schema")
    assert not stale, (f"events/schema is out of date for {stale}: run "
                       "`python -m tollway.events.schema --write`")


def test_drift_is_detected(tmp_path: Path) -> None:
    assert schema.main(["--write", "--dir", str(tmp_path)]) == 0
    assert schema.drifted(tmp_path) == []
    path = tmp_path / "call.completed.json"
    path.write_text(path.read_text().replace('"prompt_tokens"', '"prompt_tokenz"'))
    (tmp_path / "gone.json").write_text("{}")
    assert schema.drifted(tmp_path) == ["call.completed.json", "gone.json"]
    assert subprocess.run([sys.executable, "-m", "tollway.events.schema", "--check", "--dir",
                           str(tmp_path)], capture_output=True).returncode == 1


def test_fixture_file_is_what_the_generator_makes() -> None:
    assert default_fixture().read_bytes() == fixture_bytes(), (
        "run `python -m tollway.events.synthetic --write`")


def test_fixture_lines_decode_to_the_generated_events() -> None:
    # The file is rendered by the standard library, not msgspec: it must still be the events.
    lines = default_fixture().read_bytes().splitlines()
    evs = list(synthetic_events(FIXTURE_CALLS))
    assert len(lines) == len(evs)
    assert all(decode(line) == ev for line, ev in zip(lines, evs, strict=True))


@pytest.mark.parametrize("outcome, cls, subject", [
    ("completed", CallCompleted, "tollway.call.completed.acme"),
    ("failed", CallFailed, "tollway.call.failed.acme"),
    ("rejected", CallRejected, "tollway.call.rejected.acme"),
])
def test_one_event_per_record(outcome: str, cls: type, subject: str) -> None:
    rec = make_record(3, outcome=outcome, fallbacks=("openai",), ttft_s=0.1)  # type: ignore[arg-type]
    ev = event_from_record(rec, "e1", "gw")
    assert type(ev) is cls and ev.subject() == subject
    assert ev.outcome == outcome and ev.event_id == "e1" and ev.instance == "gw"
    # Every field of the record reaches the event under the same name.
    for name in msgspec.structs.fields(type(rec)):
        assert getattr(ev, name.name) == getattr(rec, name.name), name.name
    wire = encode(ev)
    assert msgspec.json.decode(wire)["type"] == f"call.{outcome}"
    assert decode(wire) == ev
    # The publisher's shortcut writes the same event, field for field.
    fast_subject, fast = encode_record(rec, "e1", 'gw "2"')
    assert fast_subject == subject
    assert decode(fast) == msgspec.structs.replace(ev, instance='gw "2"')
    assert msgspec.json.decode(fast) == msgspec.json.decode(
        encode(msgspec.structs.replace(ev, instance='gw "2"')))


def test_one_encoder_writes_every_outcome_and_any_event_id() -> None:
    """The publisher's encoder (one per instance) against the event built and encoded:
    ids that need escaping in JSON too (the publisher's own are hex)."""
    enc = schema.RecordEncoder('gw "2"\n')
    for outcome in ("completed", "failed", "rejected", "completed"):
        for event_id in ("0a1b2c", 'e"1\\', "é-1", ""):
            rec = make_record(7, outcome=outcome)  # type: ignore[arg-type]
            subject, payload = enc(rec, event_id)
            want = event_from_record(rec, event_id, 'gw "2"\n')
            assert subject == want.subject()
            assert decode(payload) == want
            assert msgspec.json.decode(payload) == msgspec.json.decode(encode(want))


def test_new_fields_with_defaults_keep_old_readers_working() -> None:
    ev = event_from_record(make_record(1), "e1")
    raw = msgspec.json.decode(encode(ev))
    raw["a_field_from_the_future"] = {"x": 1}  # a newer writer
    assert decode(msgspec.json.encode(raw)) == ev
    del raw["a_field_from_the_future"], raw["ttft_s"], raw["reason"]  # an older writer
    assert decode(msgspec.json.encode(raw)) == ev


def test_events_of_a_newer_schema_version_are_skipped() -> None:
    raw = msgspec.json.decode(encode(event_from_record(make_record(1), "e1")))
    raw["schema_version"] = schema.SCHEMA_VERSION + 1
    assert decode(msgspec.json.encode(raw)) is None
    raw["prompt_tokens"] = "a string now"  # a breaking change that came with the bump
    assert decode(msgspec.json.encode(raw)) is None


def test_subject_tokens_are_safe_and_injective() -> None:
    assert subject_token("acme") == "acme"
    assert subject_token("a_b-9") == "a_b-9"
    assert subject_token("") == "~"
    for bad in ("a.b", "a*", "a>", "a b", "é", "~"):
        tok = subject_token(bad)
        assert all(c not in tok for c in ".*> \t") and tok.isascii()
    names = ["a.b", "a_b", "a~2Eb", "a b", "a~20b", "", "~"]
    assert len({subject_token(n) for n in names}) == len(names)
