"""Shadow mode with the events layer on: the comparisons go through JetStream and back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from events.helpers import read_stream
from support import eventually
from tollway.events.broker import connect
from tollway.events.schema import ShadowCompared
from tollway.testing.upstream import Fault

from .rig import rig

# max_in_flight: room for every shadow call (over the cap one is skipped, and on a loaded
# machine the earlier calls' shadows may still run; test_shadow_e2e.ONE).
SHADOW = [{"route": "auto", "candidates": ["small"], "fraction": 1.0, "daily_usd": 1.0,
           "max_in_flight": 1000}]


def test_comparisons_are_events_and_the_report_folds_the_stream(
        tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    data = tmp_path / "data"
    nats = {"url": "embedded", "data_dir": str(data)}
    with rig(SHADOW, nats=nats, events={"checkpoint_interval_s": 0.5}) as r:
        svc = r.gateway.events
        assert svc is not None and r.shadow.source == "events"
        for i in range(4):
            assert r.chat(f"q {i}", stream=i % 2 == 1).status_code == 200
        r.candidate.add_fault(Fault(status=500, times=1))
        assert r.chat("failing").status_code == 200
        assert eventually(lambda: r.report()["data"]
                           and r.report()["data"][0]["samples"] == 5), r.report()
        doc = r.report()
        url = svc.url

        async def stream() -> list[Any]:
            nc = await connect(url)
            try:
                return await read_stream(nc, "tollway.shadow.compared.acme")
            finally:
                await nc.close()

        msgs = asyncio.run(stream())
        # The admin endpoint's figures are the fold of what is on the stream.
        events = [e for _, _, e in msgs]
        assert len(events) == 5 and all(isinstance(e, ShadowCompared) for e in events)
        assert all(h["Nats-Msg-Id"] == e.event_id for _, h, e in msgs if e is not None)
        row = doc["data"][0]
        assert doc["source"] == "events"
        assert row["errors"] == sum(e.candidate_error is not None for e in events) == 1
        assert row["shadow_spend_usd"] * 1e9 == sum(e.candidate_cost_nanousd for e in events)
        assert row["agreement_mean"] == 1.0
        runtime = doc["runtime"]["auto"]
        assert runtime["spend"]["spent_usd"] * 1e9 == sum(e.candidate_cost_nanousd
                                                          for e in events)
        # Call events carry no shadow spend: the tenant's usage is the primary calls only.
        usage = r.http.get("/api/ai/usage", headers={"Authorization": "Bearer "
                                                     + "tw-test-acme-0123456789"}).json()
        assert usage["total"]["requests"] == 5
        assert {m["key"] for m in usage["by_model"]} == {"big"}
    # The same table from the stream, with no gateway running.
    cfg = tmp_path / "tollway.toml"
    cfg.write_text(f'[server]\nbuiltin_providers = false\nbuiltin_models = false\n'
                   f'[nats]\nurl = "embedded"\ndata_dir = {json.dumps(str(data))}\n')
    from tollway.cli import main

    assert main(["shadow", "report", "--config", str(cfg), "--stream", "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["data"] == doc["data"]
