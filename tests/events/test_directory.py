"""Tenants and keys at run time (issue 15): the admin API, its events, and two gateways on
one NATS that authenticate against the same directory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import pytest

from support import (
    ACME_KEY,
    ADMIN_KEY,
    UPSTREAM_KEY,
    Server,
    auth,
    chat_body,
    eventually,
    gateway_env,
    make_raw_config,
)
from tollway.app import create_app
from tollway.config import parse_config
from tollway.events.broker import EmbeddedNats
from tollway.events.projections import directory as directory_view
from tollway.events.schema import (
    CallCompleted,
    CallFailed,
    CallRejected,
    KeyCreated,
    KeyRevoked,
    TenantChanged,
    TenantCreated,
    decode,
)
from tollway.testing.upstream import FakeUpstream

ADMIN = auth(ADMIN_KEY)
PROPAGATION_S = 1.0  # the bound for a change to reach another gateway


class Pair:
    """Two in-process gateways (own data folders and instance names) on one nats-server."""

    def __init__(self, a: Server, b: Server, upstream: FakeUpstream) -> None:
        self.a, self.b = httpx.Client(base_url=a.url), httpx.Client(base_url=b.url)
        self.gateways = (a.app.state.gateway, b.app.state.gateway)
        self.upstream = upstream

    def close(self) -> None:
        self.a.close()
        self.b.close()


def _config(url: str, nats_url: str, data: Path, **extra: Any) -> Any:
    raw = make_raw_config(url, nats={"url": nats_url, "data_dir": str(data)}, **extra)
    raw["tiers"] = {"standard": {"max_call_usd": 0.05, "daily_usd": 5.0},
                    "low": {"max_call_usd": 0.01, "daily_usd": 1.0}}
    return parse_config(raw, source="<test>", env=gateway_env())


@pytest.fixture
def pair(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[Pair]:
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(FakeUpstream(api_key=UPSTREAM_KEY))
        a, b = (stack.enter_context(Server(create_app(
            _config(up.base_url, nats_server.url, tmp_path / name), env=gateway_env())))
            for name in "ab")
        p = Pair(a, b, up)
        try:
            yield p
        finally:
            p.close()


def _chat(client: httpx.Client, key: str, **kw: Any) -> httpx.Response:
    return client.post("/api/ai/v1/chat/completions", headers=auth(key),
                       json=chat_body(**kw))


def _within(check: Any, seconds: float = PROPAGATION_S) -> float:
    """Seconds until ``check()`` holds; fails past ``seconds``."""
    t0 = time.monotonic()
    assert eventually(check, timeout=seconds + 5), "never held"
    took = time.monotonic() - t0
    assert took <= seconds, f"took {took:.2f} s"
    return took


def test_a_key_made_on_one_gateway_works_on_the_other_and_its_revocation_too(pair: Pair) -> None:
    r = pair.a.post("/api/ai/admin/tenants", headers=ADMIN,
                    json={"id": "initech", "tier": "low", "daily_usd": 2.5,
                          "limits": {"per_minute": 100}})
    assert r.status_code == 201, r.text
    tenant = r.json()
    assert tenant["source"] == "admin" and tenant["tier"] == "low"
    assert tenant["limits"]["per_minute"] == 100 and tenant["limits"]["per_hour"] == 1000
    assert tenant["created_by"].startswith("sha256:")

    made = pair.a.post("/api/ai/admin/keys", headers=ADMIN,
                       json={"tenant": "initech", "name": "ci"})
    assert made.status_code == 201, made.text
    key = made.json()
    secret = key["key"]
    assert secret.startswith("tw-") and key["prefix"] == secret[:8] and key["state"] == "active"
    # Read-your-write on the gateway that made it; within a second on the other one.
    assert _chat(pair.a, secret).status_code == 200
    _within(lambda: _chat(pair.b, secret).status_code == 200)
    call = pair.upstream.requests[-1]
    assert call.path == "/v1/chat/completions"

    # The listing never shows the key nor its hash; it shows the last use.
    listed = pair.a.get("/api/ai/admin/keys", params={"tenant": "initech"}, headers=ADMIN)
    assert listed.status_code == 200
    (row,) = listed.json()["data"]
    assert row["id"] == key["id"] and row["last_used_at"] is not None
    assert secret not in listed.text and "sha256" not in row

    # Revoked through b: refused on a within a second, with a clear code.
    revoked = pair.b.delete(f"/api/ai/admin/keys/{key['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    _within(lambda: _chat(pair.a, secret).status_code == 401)
    refused = _chat(pair.a, secret)
    assert refused.json()["error"]["code"] == "revoked_api_key"


def test_the_tenant_s_settings_apply_limits_budget_models_and_sensitivity(pair: Pair) -> None:
    assert pair.a.post("/api/ai/admin/tenants", headers=ADMIN, json={
        "id": "hooli", "limits": {"per_minute": 2}, "models": ["fast"],
        "max_sensitivity": "internal"}).status_code == 201
    secret = pair.a.post("/api/ai/admin/keys", headers=ADMIN,
                         json={"tenant": "hooli"}).json()["key"]
    denied = _chat(pair.a, secret, model="gpt-4o-mini")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert _chat(pair.a, secret, model="fast").status_code == 200
    above = pair.a.post("/api/ai/v1/chat/completions", json=chat_body(model="fast"),
                        headers={**auth(secret), "X-Tollway-Sensitivity": "confidential"})
    assert above.status_code == 403
    assert above.json()["error"]["code"] == "sensitivity_not_allowed"
    assert _chat(pair.a, secret, model="fast").status_code == 200
    limited = _chat(pair.a, secret, model="fast")
    assert limited.status_code == 429 and limited.headers["x-ratelimit-limit-requests"] == "2"

    # Raised at run time: the next calls pass, on both gateways.
    r = pair.b.patch("/api/ai/admin/tenants/hooli", headers=ADMIN,
                     json={"limits": {"per_minute": 1000}, "models": None})
    assert r.status_code == 200, r.text
    assert r.json()["limits"]["per_minute"] == 1000 and r.json()["models"] is None
    _within(lambda: _chat(pair.a, secret, model="gpt-4o-mini").status_code == 200)

    budget = pair.a.get("/api/ai/budget", params={"tenant": "hooli"}, headers=ADMIN)
    assert budget.status_code == 200 and budget.json()["daily_usd"] == 5.0  # its tier's

    # Disabled: every key of the tenant is refused (403), on both gateways.
    assert pair.a.delete("/api/ai/admin/tenants/hooli", headers=ADMIN).json()["disabled"]
    _within(lambda: _chat(pair.b, secret, model="fast").status_code == 403)
    assert _chat(pair.b, secret).json()["error"]["code"] == "tenant_disabled"


def test_rotation_keeps_the_old_key_for_the_overlap_and_expiry_ends_a_key(pair: Pair) -> None:
    old = pair.a.post("/api/ai/admin/keys", headers=ADMIN,
                      json={"tenant": "acme", "name": "svc"}).json()
    rotated = pair.a.post(f"/api/ai/admin/keys/{old['id']}/rotate", headers=ADMIN,
                          json={"overlap_s": 0.5})
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["key"] != old["key"] and new["rotated_from"] == old["id"]
    assert new["previous"]["rotated_to"] == new["id"] and new["name"] == "svc"
    assert _chat(pair.a, new["key"]).status_code == 200
    assert _chat(pair.a, old["key"]).status_code == 200  # the overlap
    assert eventually(lambda: _chat(pair.a, old["key"]).status_code == 401, timeout=5)
    assert _chat(pair.a, old["key"]).json()["error"]["code"] == "expired_api_key"
    # Config keys keep working beside directory keys of the same tenant.
    assert _chat(pair.a, ACME_KEY).status_code == 200
    again = pair.a.post(f"/api/ai/admin/keys/{old['id']}/rotate", headers=ADMIN, json={})
    assert again.status_code == 409 and again.json()["error"]["code"] == "key_not_active"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/api/ai/admin/tenants", {"id": "bad.id"}, "id"),
    ("/api/ai/admin/tenants", {"id": "a>b"}, "id"),
    ("/api/ai/admin/tenants", {"id": "x" * 65}, "id"),
    ("/api/ai/admin/tenants", {"id": "ok", "tier": "gold"}, "tier"),
    ("/api/ai/admin/tenants", {"id": "ok", "models": ["gpt-9"]}, "models"),
    ("/api/ai/admin/tenants", {"id": "ok", "limits": {"per_minute": -1}}, "limits.per_minute"),
    ("/api/ai/admin/tenants", {"id": "ok", "daily_usd": "lots"}, "daily_usd"),
    ("/api/ai/admin/tenants", {"id": "ok", "max_sensitivity": "secret"}, "max_sensitivity"),
    ("/api/ai/admin/tenants", {"id": "ok", "owner": "me"}, None),
    ("/api/ai/admin/keys", {"tenant": "acme", "expires_at": 1.0}, "expires_at"),
    ("/api/ai/admin/keys", {"tenant": "acme", "daily_usd": -1}, "daily_usd"),
    ("/api/ai/admin/keys", {"tenant": "acme", "limits": {"per_minute": "x"}},
     "limits.per_minute"),
    ("/api/ai/admin/keys", {}, "tenant"),
])
def test_bad_admin_input_is_a_400_naming_the_field(pair: Pair, path: str, body: Any,
                                                   param: str | None) -> None:
    r = pair.a.post(path, headers=ADMIN, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    else:
        assert "unknown field" in error["message"].lower() or "limits" in error["message"]


def test_who_may_change_what(pair: Pair) -> None:
    # A tenant key is not an admin key.
    r = pair.a.post("/api/ai/admin/tenants", headers=auth(ACME_KEY), json={"id": "evil"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    # The config file's tenants are the config's.
    r = pair.a.patch("/api/ai/admin/tenants/acme", headers=ADMIN, json={"tier": "low"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tenant_in_config"
    assert pair.a.get("/api/ai/admin/tenants/acme", headers=ADMIN).json()["source"] == "config"
    # One tenant per id, whichever gateway is asked.
    assert pair.a.post("/api/ai/admin/tenants", headers=ADMIN,
                       json={"id": "umbrella"}).status_code == 201
    twice = pair.b.post("/api/ai/admin/tenants", headers=ADMIN, json={"id": "umbrella"})
    assert twice.status_code == 409
    assert pair.b.get("/api/ai/admin/tenants/nobody", headers=ADMIN).status_code == 404
    assert pair.b.delete("/api/ai/admin/keys/key_nope", headers=ADMIN).status_code == 404
    ids = [t["id"] for t in pair.b.get("/api/ai/admin/tenants", headers=ADMIN).json()["data"]]
    assert {"acme", "globex", "umbrella"} <= set(ids)


def test_repeated_failed_admin_sign_ins_are_refused_for_a_while(pair: Pair) -> None:
    codes = [pair.a.get("/api/ai/admin/tenants", headers=auth(f"tw-guess-{i}")).status_code
             for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    blocked = pair.a.get("/api/ai/admin/tenants", headers=ADMIN)  # even the right key, now
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    # Other paths and the other gateway are not affected.
    assert pair.b.get("/api/ai/admin/tenants", headers=ADMIN).status_code == 200
    assert _chat(pair.a, ACME_KEY).status_code == 200


def test_every_change_is_an_event_naming_the_admin_key(pair: Pair,
                                                       nats_server: EmbeddedNats) -> None:
    import asyncio

    import nats

    pair.a.post("/api/ai/admin/tenants", headers=ADMIN, json={"id": "stark"})
    pair.a.patch("/api/ai/admin/tenants/stark", headers=ADMIN, json={"daily_usd": 1.0})
    key = pair.a.post("/api/ai/admin/keys", headers=ADMIN, json={"tenant": "stark"}).json()
    pair.a.delete(f"/api/ai/admin/keys/{key['id']}", headers=ADMIN)

    async def read() -> list[Any]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            sub = await js.subscribe("tollway.admin.>", ordered_consumer=True)
            out = []
            for _ in range(4):
                msg = await sub.next_msg(timeout=5)
                out.append((msg.subject, decode(msg.data)))
            return out
        finally:
            await nc.close()

    events = asyncio.run(read())
    kinds = [type(e) for _, e in events]
    assert kinds == [TenantCreated, TenantChanged, KeyCreated, KeyRevoked]
    assert events[0][0] == "tollway.admin.tenant.created.stark"
    assert events[2][0] == f"tollway.admin.key.created.{key['id']}"
    assert len({e.admin for _, e in events}) == 1 and events[0][1].admin.startswith("sha256:")
    assert key["key"] not in str(events)  # only the hash travels


def test_the_fold_is_idempotent_and_keeps_the_first_create() -> None:
    from tollway.events.schema import TenantSettings

    view = directory_view.new()
    first = TenantCreated(event_id="e1", occurred_at=1.0, tenant="t",
                          settings=TenantSettings(tier="low"))
    second = TenantCreated(event_id="e2", occurred_at=2.0, tenant="t",
                           settings=TenantSettings(tier="standard"))
    key = KeyCreated(event_id="e3", occurred_at=3.0, tenant="t", key_id="k",
                     key_sha256="ab" * 32)
    revoke = KeyRevoked(event_id="e4", occurred_at=4.0, tenant="t", key_id="k")
    for seq, event in enumerate((first, second, key, revoke), 1):
        directory_view.apply(view, seq, event)
    snapshot = directory_view.dump(view)
    for event in (first, second, key, revoke):  # replayed past what seen remembers
        directory_view.skipped(view, 0, event)
    assert directory_view.dump(view) == snapshot
    assert view.tenants["t"].settings.tier == "low" and view.keys["k"].revoked_at == 4.0
    assert directory_view.load(snapshot) == view


def test_a_key_s_last_use_is_the_latest_call_event_naming_it() -> None:
    view = directory_view.new()
    directory_view.apply(view, 1, KeyCreated(event_id="k", occurred_at=1.0, tenant="t",
                                             key_id="key_a", key_sha256="ab" * 32))
    version = view.version
    calls = [CallCompleted(event_id="c1", occurred_at=5.0, tenant="t", key_id="key_a"),
             CallRejected(event_id="c2", occurred_at=7.0, tenant="t", key_id="key_a"),
             # folded later, made earlier (another gateway's): no step back
             CallFailed(event_id="c3", occurred_at=6.0, tenant="t", key_id="key_a"),
             # a config key (no id) and an id the directory never made: nothing kept
             CallCompleted(event_id="c4", occurred_at=9.0, tenant="t"),
             CallCompleted(event_id="c5", occurred_at=9.0, tenant="t", key_id="key_zz")]
    for seq, event in enumerate(calls, 2):
        directory_view.apply(view, seq, event)
    assert view.last_used == {"key_a": 7.0}
    assert view.version == version  # nothing the gateway derives from the view moved
    directory_view.skipped(view, 0, calls[0])  # replayed: no step back either
    assert directory_view.load(directory_view.dump(view)).last_used == {"key_a": 7.0}
    # A checkpoint from before last uses were kept loads, with none.
    older = msgspec.msgpack.decode(directory_view.dump(view))
    del older["last_used"]
    loaded = directory_view.load(msgspec.msgpack.encode(older))
    assert loaded.last_used == {} and loaded.keys == view.keys


def test_a_key_s_last_use_shows_on_a_gateway_that_never_served_it(pair: Pair) -> None:
    assert pair.a.post("/api/ai/admin/tenants", headers=ADMIN,
                       json={"id": "vandelay"}).status_code == 201
    key = pair.a.post("/api/ai/admin/keys", headers=ADMIN, json={"tenant": "vandelay"}).json()

    def listed(client: httpx.Client) -> list[dict[str, Any]]:
        got = client.get("/api/ai/admin/keys", params={"tenant": "vandelay"}, headers=ADMIN)
        assert got.status_code == 200, got.text
        return cast("list[dict[str, Any]]", got.json()["data"])

    def last_use(client: httpx.Client) -> float | None:
        (row,) = listed(client)
        assert row["id"] == key["id"]
        return cast("float | None", row["last_used_at"])

    _within(lambda: len(listed(pair.b)) == 1)
    assert last_use(pair.a) is None and last_use(pair.b) is None
    before = time.time()
    assert _chat(pair.a, key["key"]).status_code == 200
    _within(lambda: last_use(pair.b) is not None)
    seen_on_b = last_use(pair.b)
    assert seen_on_b is not None and before - 1 <= seen_on_b <= time.time()
    # a, which served the call, shows the same call.
    assert last_use(pair.a) == pytest.approx(seen_on_b, abs=1.0)


def test_the_command_line_drives_the_admin_api(pair: Pair, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tollway.cli import main

    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", ADMIN_KEY)
    url = ["--url", str(pair.a.base_url)]
    assert main(["tenants", "create", "wayne", "--tier", "low", "--per-minute", "7", *url]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["id"] == "wayne" and made["limits"]["per_minute"] == 7
    assert main(["keys", "create", "--tenant", "wayne", "--name", "cli", *url]) == 0
    key = json.loads(capsys.readouterr().out)
    _within(lambda: _chat(pair.b, key["key"]).status_code == 200)
    assert main(["keys", "list", "--tenant", "wayne", *url]) == 0
    assert [k["name"] for k in json.loads(capsys.readouterr().out)["data"]] == ["cli"]
    assert main(["keys", "revoke", key["id"], *url]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "revoked"
    assert main(["tenants", "update", "wayne", "--disable", *url]) == 0
    assert json.loads(capsys.readouterr().out)["disabled"] is True
    # An error is the gateway's message and exit code 1; the key never on the command line.
    assert main(["tenants", "create", "wayne", *url]) == 1
    assert "409" in capsys.readouterr().err
    monkeypatch.delenv("TOLLWAY_ADMIN_KEY")
    assert main(["tenants", "list", *url]) == 1
    assert "TOLLWAY_ADMIN_KEY" in capsys.readouterr().err


def _members(gateway: Any, tenants: list[str]) -> set[str]:
    return {t for t in tenants if gateway.directory.rollout("auto", t) is not None}


def test_a_rollout_takes_a_sticky_share_of_tenants_and_the_call_event_names_it(
        pair: Pair, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    import asyncio

    import nats

    put = pair.a.put("/api/ai/admin/flags/auto-fast", headers=ADMIN, json={
        "route": "auto", "candidates": ["fast"], "percent": 10})
    assert put.status_code == 200, put.text
    assert put.json()["percent"] == 10 and put.json()["changed_by"].startswith("sha256:")
    synthetic = [f"tenant-{i}" for i in range(1000)]
    ga, gb = pair.gateways
    ten = _members(ga, synthetic)
    assert 80 <= len(ten) <= 120, len(ten)  # 10 % of 1,000, give or take 2 %
    _within(lambda: _members(gb, synthetic) == ten)  # the same tenants on every gateway
    pair.b.put("/api/ai/admin/flags/auto-fast", headers=ADMIN, json={
        "route": "auto", "candidates": ["fast"], "percent": 50})
    half = _members(gb, synthetic)
    assert 450 <= len(half) <= 550 and ten < half  # who was in stays in

    # A gateway started afterwards (a restart) folds the flag from the stream: same tenants.
    with FakeUpstream(api_key=UPSTREAM_KEY) as up, Server(create_app(
            _config(up.base_url, nats_server.url, tmp_path / "c"), env=gateway_env())) as c:
        fresh = c.app.state.gateway
        assert eventually(lambda: _members(fresh, synthetic) == half)

    # Listed tenants are in whatever the percent: acme's calls to auto go to `fast`, and
    # the call event says which flag moved them.
    pair.a.put("/api/ai/admin/flags/auto-fast", headers=ADMIN, json={
        "route": "auto", "candidates": ["fast"], "percent": 0, "tenants": ["acme"]})
    served = _chat(pair.a, ACME_KEY, model="auto")
    assert served.status_code == 200 and served.headers["x-tollway-model"] == "fast"
    listed = pair.a.get("/api/ai/admin/flags", headers=ADMIN).json()["data"]
    assert [f["name"] for f in listed] == ["auto-fast"] and listed[0]["tenants"] == ["acme"]
    pair.a.put("/api/ai/admin/flags/auto-fast", headers=ADMIN, json={
        "route": "auto", "candidates": ["fast"], "tenants": ["acme"], "enabled": False})
    assert _chat(pair.a, ACME_KEY, model="auto").headers["x-tollway-model"] == "gpt-4o-mini"

    async def flags_of_acme_calls() -> list[tuple[str, ...]]:
        nc = await nats.connect(nats_server.url)
        try:
            sub = await nc.jetstream().subscribe("tollway.call.completed.acme",
                                                 ordered_consumer=True)
            out = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=1)
                except nats.errors.TimeoutError:
                    return out
                out.append(decode(msg.data).flags)  # type: ignore[union-attr]
        finally:
            await nc.close()

    assert eventually(lambda: asyncio.run(flags_of_acme_calls()) == [("auto-fast",), ()])


@pytest.mark.parametrize(("name", "body", "param"), [
    ("ok", {"route": "nope", "candidates": ["fast"]}, "route"),
    ("ok", {"route": "auto", "candidates": ["auto"]}, "candidates"),
    ("ok", {"route": "auto", "candidates": []}, "candidates"),
    ("ok", {"route": "auto", "candidates": ["fast"], "percent": 101}, "percent"),
    ("ok", {"route": "auto", "candidates": ["fast"], "tenants": ["a.b"]}, "tenants[0]"),
    ("bad.name", {"route": "auto", "candidates": ["fast"]}, "name"),
])
def test_bad_flags_are_a_400_naming_the_field(pair: Pair, name: str, body: Any,
                                              param: str) -> None:
    r = pair.a.put(f"/api/ai/admin/flags/{name}", headers=ADMIN, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_key_s_own_limits_hold_beside_the_tenant_s(pair: Pair) -> None:
    made = pair.a.post("/api/ai/admin/keys", headers=ADMIN,
                       json={"tenant": "acme", "limits": {"per_minute": 2}})
    assert made.status_code == 201, made.text
    key = made.json()
    assert key["limits"]["per_minute"] == 2 and key["limits"]["per_hour"] == 0
    assert [_chat(pair.a, key["key"]).status_code for _ in range(3)] == [200, 200, 429]
    refused = _chat(pair.a, key["key"])
    assert "this key" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    # The tenant's other keys are not held back by this key's limit.
    assert _chat(pair.a, ACME_KEY).status_code == 200
    # A rotated key keeps the limits.
    new = pair.a.post(f"/api/ai/admin/keys/{key['id']}/rotate", headers=ADMIN, json={})
    assert new.json()["limits"] == key["limits"]


def test_a_key_s_own_budget_holds_beside_the_tenant_s_on_every_gateway(pair: Pair) -> None:
    """Concurrent calls through both gateways never take a key past its own daily budget;
    the key's refusal names it, and the tenant's other keys go on."""
    u = _chat(pair.a, ACME_KEY, max_tokens=60).json()["usage"]
    one_call = u["prompt_tokens"] * 150 + u["completion_tokens"] * 600  # nano-USD
    usd = 10.5 * one_call / 1e9  # ten calls of this size
    made = pair.a.post("/api/ai/admin/keys", headers=ADMIN,
                       json={"tenant": "acme", "name": "capped", "daily_usd": usd})
    assert made.status_code == 201, made.text
    key = made.json()
    assert key["daily_usd"] == usd
    secret = key["key"]
    _within(lambda: _chat(pair.b, secret, max_tokens=60).status_code == 200)

    def one(i: int) -> httpx.Response:
        return _chat(pair.a if i % 2 else pair.b, secret, max_tokens=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(40)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes and 429 in codes, codes
    refused = next(r for r in answers if r.status_code == 429).json()["error"]
    assert refused["code"] == "insufficient_quota"
    assert f"this key ({key['id']})" in refused["message"]
    # The tenant's day is far from spent: its config key still calls.
    assert _chat(pair.a, ACME_KEY).status_code == 200

    def figures(client: httpx.Client) -> dict[str, Any]:
        r = client.get("/api/ai/budget", params={"tenant": "acme", "key_id": key["id"]},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        return cast(dict[str, Any], r.json())

    # Once every call's event is folded, the key's spend is every answered call's cost
    # (the upstream's usage, priced), never more than its budget, the same on both.
    spent = 0
    for r in answers:
        if r.status_code == 200:
            u = r.json()["usage"]
            spent += u["prompt_tokens"] * 150 + u["completion_tokens"] * 600  # nano-USD
    assert eventually(lambda: figures(pair.a)["reserved_nanousd"] == 0
                      and figures(pair.a)["spent_nanousd"] >= spent)
    own = figures(pair.a)
    assert own["key"] == key["id"] and own["daily_nanousd"] == round(usd * 1e9)
    assert own["spent_nanousd"] <= own["daily_nanousd"]
    assert eventually(lambda: figures(pair.b)["spent_nanousd"] == own["spent_nanousd"])
    tenant = pair.a.get("/api/ai/budget", params={"tenant": "acme"}, headers=ADMIN).json()
    assert tenant["spent_nanousd"] >= own["spent_nanousd"]

    # A rotated key spends from the same account: no fresh day of budget.
    new = pair.a.post(f"/api/ai/admin/keys/{key['id']}/rotate", headers=ADMIN, json={})
    assert new.status_code == 201 and new.json()["daily_usd"] == usd
    _within(lambda: _chat(pair.b, new.json()["key"], max_tokens=60).status_code == 429)
    # A key of another tenant, or one without a budget of its own, has no figures here.
    bad = pair.a.get("/api/ai/budget", params={"tenant": "globex", "key_id": key["id"]},
                     headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "key_id"


def test_a_shadow_flag_samples_only_the_tenants_in_it(nats_server: EmbeddedNats,
                                                      tmp_path: Path) -> None:
    from support import GLOBEX_KEY
    from tollway.auth import hash_key

    def sampled(client: httpx.Client) -> float:
        text = client.get("/api/ai/metrics").text
        for line in text.splitlines():
            if line.startswith('tollway_shadow_sampled_total{route="auto"}'):
                return float(line.split()[-1])
        return 0.0

    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = _config(up.base_url, nats_server.url, tmp_path / "s",
                      tenants=[{"id": t, "key_sha256": [hash_key(k)]}
                               for t, k in (("acme", ACME_KEY), ("globex", GLOBEX_KEY))],
                      shadow=[{"route": "auto", "candidates": ["fast"], "fraction": 1.0}])
        with Server(create_app(cfg, env=gateway_env())) as server, \
                httpx.Client(base_url=server.url, timeout=30) as client:
            assert _chat(client, ACME_KEY, model="auto").status_code == 200
            assert eventually(lambda: sampled(client) == 1)  # no flag: every tenant's calls
            r = client.put("/api/ai/admin/flags/shadow-globex", headers=ADMIN, json={
                "kind": "shadow", "route": "auto", "tenants": ["globex"]})
            assert r.status_code == 200, r.text
            for _ in range(3):
                assert _chat(client, ACME_KEY, model="auto").status_code == 200
            assert _chat(client, GLOBEX_KEY, model="auto").status_code == 200
            assert eventually(lambda: sampled(client) == 2)
            assert sampled(client) == 2  # acme's three were not sampled
            bad = client.put("/api/ai/admin/flags/x", headers=ADMIN, json={
                "kind": "shadow", "route": "fast"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "route"


def test_a_guard_flag_sets_the_per_call_cap_of_the_tenants_in_it(pair: Pair) -> None:
    from support import GLOBEX_KEY

    r = pair.a.put("/api/ai/admin/flags/tight-cap", headers=ADMIN, json={
        "kind": "guard", "route": "*", "max_call_usd": 0.0000001, "tenants": ["acme"]})
    assert r.status_code == 200, r.text
    refused = _chat(pair.a, ACME_KEY, model="fast")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "cost_limit_exceeded"
    assert _chat(pair.a, GLOBEX_KEY, model="fast").status_code == 200  # not in it
    pair.b.put("/api/ai/admin/flags/tight-cap", headers=ADMIN, json={
        "kind": "guard", "route": "*", "max_call_usd": 0.0000001, "tenants": ["acme"],
        "enabled": False})
    _within(lambda: _chat(pair.a, ACME_KEY, model="fast").status_code == 200)
    for body, param in (({"kind": "guard", "route": "*"}, "max_call_usd"),
                        ({"kind": "route", "route": "auto", "candidates": ["fast"],
                          "max_call_usd": 1.0}, "max_call_usd")):
        bad = pair.a.put("/api/ai/admin/flags/x", headers=ADMIN, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param
