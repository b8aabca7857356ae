"""``tollway.GuardMiddleware`` in front of a host Starlette app's own routes, served by
uvicorn on loopback, the host's lifespan running a ``tollway.Gateway`` with the embedded
nats-server: the tenant's 60/minute limit, its daily budget (an explicit cost, a token
estimate of the body, a cost the route reports), the sensitivity rule, and one call event
per request on the stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import tollway
from support import UPSTREAM_KEY, ListRecorder, Server, eventually, gateway_env, make_config
from tollway.middleware.guard import COST_KEY
from tollway.testing.upstream import FakeUpstream

BIG = 10**9
SEARCH_USD = 0.004


def _tenant(id_: str, per_minute: int = BIG, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "tier": "standard", "limits": {
        "per_minute": per_minute, "per_hour": BIG, "per_day": BIG,
        "expensive_per_hour": BIG}, **extra}


async def search(request: Request) -> Response:
    return JSONResponse({"hits": []})


async def summarize(request: Request) -> Response:
    return JSONResponse({"read": len(await request.body())})


async def report(request: Request) -> Response:
    request.scope[COST_KEY] = 0.001  # what this call really cost
    return JSONResponse({"ok": True})


async def broken(request: Request) -> Response:
    return JSONResponse({"error": "down"}, status_code=503)


def host_app(gw: tollway.Gateway) -> Starlette:
    def tenant(scope: Any) -> str | None:
        for name, value in scope["headers"]:
            if name == b"x-user":
                user = bytes(value).decode()
                if user == "crash":
                    raise RuntimeError("the host's session store is down")
                return user
        return None

    return Starlette(
        routes=[Route("/search", search), Route("/summarize", summarize, methods=["POST"]),
                Route("/report", report), Route("/broken", broken),
                Route("/open", search)],
        middleware=[
            Middleware(tollway.GuardMiddleware, gateway=gw, tenant=tenant,
                       cost=lambda scope: SEARCH_USD, endpoint="search",
                       paths=["/search", "/report", "/broken"]),
            Middleware(tollway.GuardMiddleware, gateway=gw, tenant=tenant,
                       model="gpt-4o-mini", output_tokens=100, endpoint="summarize",
                       paths=["/summarize"]),
        ],
        lifespan=gw.lifespan)


class Host:
    def __init__(self, server: Server, gw: tollway.Gateway, recorder: ListRecorder) -> None:
        self.server = server
        self.gw = gw
        self.recorder = recorder

    def records(self, **match: Any) -> list[Any]:
        return [r for r in self.recorder.records
                if all(getattr(r, k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    data = Path(tmp_path_factory.mktemp("guard")) / "data"
    recorder = ListRecorder()
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = make_config(up.base_url, nats={"url": "embedded", "data_dir": str(data)},
                          tenants=[_tenant("minute", per_minute=60, daily_usd=1000.0),
                                   _tenant("thrifty", daily_usd=0.01),
                                   _tenant("words", daily_usd=1000.0),
                                   _tenant("careful", daily_usd=1000.0,
                                           max_sensitivity="internal")])
        gw = tollway.Gateway(cfg, env=gateway_env(), recorder=recorder)
        with Server(host_app(gw)) as server:
            yield Host(server, gw, recorder)


@pytest.fixture
def client(host: Host) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=host.server.url, timeout=20) as c:
        yield c


def test_sixty_a_minute_then_429(host: Host, client: httpx.Client) -> None:
    for i in range(60):
        r = client.get("/search", headers={"x-user": "minute"})
        assert r.status_code == 200, (i, r.text)
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        # (the fleet's shared limits report what this process's allotment leaves, at most)
        assert 0 <= int(r.headers["x-ratelimit-remaining-requests"]) <= 59 - i
    refused = client.get("/search", headers={"x-user": "minute"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    done = eventually(lambda: len(host.records(tenant="minute")) == 61 and host.records(
        tenant="minute"))
    assert [r.outcome for r in done].count("completed") == 60
    (rejected,) = [r for r in done if r.outcome == "rejected"]
    assert (rejected.endpoint, rejected.route, rejected.status, rejected.error_code) == (
        "search", "/search", 429, "rate_limit_exceeded")


def test_the_daily_budget_holds_each_call_and_refuses_past_it(
        host: Host, client: httpx.Client) -> None:
    for _ in range(2):  # 0.008 of 0.01 USD
        assert client.get("/search", headers={"x-user": "thrifty"}).status_code == 200
    refused = client.get("/search", headers={"x-user": "thrifty"})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    book = host.gw.core.budget_book()
    assert eventually(lambda: book.spent_today("thrifty") == 2 * 4_000_000), (
        "the spend is the two calls' cost, as the stream's budget view folds it")
    records = host.records(tenant="thrifty")
    assert sorted(r.actual_cost_nanousd for r in records) == [0, 4_000_000, 4_000_000]


def test_a_token_estimate_of_the_body_prices_the_call(host: Host, client: httpx.Client) -> None:
    text = "please summarize these words for me " * 20
    r = client.post("/summarize", content=text.encode(), headers={"x-user": "words"})
    assert r.status_code == 200 and r.json() == {"read": len(text.encode())}  # body intact
    (rec,) = eventually(lambda: host.records(tenant="words", endpoint="summarize"))
    tokens = tollway.count_tokens(text, "o200k_base")
    assert rec.prompt_tokens == tokens and rec.completion_tokens == 100
    expected = host.gw.core.estimator.cost("gpt-4o-mini", tokens, 100)
    assert rec.estimated_cost_nanousd == rec.actual_cost_nanousd == expected > 0


def test_a_route_reports_its_own_cost_and_an_error_costs_nothing(
        host: Host, client: httpx.Client) -> None:
    assert client.get("/report", headers={"x-user": "words"}).status_code == 200
    assert client.get("/broken", headers={"x-user": "words"}).status_code == 503
    reported = eventually(lambda: host.records(tenant="words", route="/report"))
    assert reported[0].actual_cost_nanousd == 1_000_000
    (failed,) = eventually(lambda: host.records(tenant="words", route="/broken"))
    assert (failed.outcome, failed.status, failed.actual_cost_nanousd) == ("failed", 503, 0)


def test_sensitivity_above_the_tenants_cap_is_refused(host: Host, client: httpx.Client) -> None:
    headers = {"x-user": "careful", "X-Tollway-Sensitivity": "confidential"}
    r = client.get("/search", headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "sensitivity_not_allowed"
    ok = client.get("/search", headers={**headers, "X-Tollway-Sensitivity": "internal"})
    assert ok.status_code == 200
    assert client.get("/search", headers={**headers, "X-Tollway-Sensitivity": "internal",
                                          "X-Tollway-Task": "nonsense"}).status_code == 400
    outcomes = eventually(lambda: len(host.records(tenant="careful")) == 3 and [
        (r.outcome, r.sensitivity) for r in host.records(tenant="careful")])
    assert outcomes == [("rejected", "confidential"), ("completed", "internal"),
                        ("rejected", "internal")]


def test_callers_the_host_does_not_name_are_refused(client: httpx.Client) -> None:
    nobody = client.get("/search")
    assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "missing_tenant"
    stranger = client.get("/search", headers={"x-user": "stranger"})
    assert stranger.status_code == 403 and stranger.json()["error"]["code"] == "unknown_tenant"
    assert client.get("/open").status_code == 200  # a path the middleware does not guard
    crashed = client.get("/search", headers={"x-user": "crash"})  # the host's callable raised
    assert crashed.status_code == 500 and crashed.json()["error"]["type"] == "api_error"


async def test_every_guarded_call_is_an_event_on_the_stream(host: Host) -> None:
    from events.helpers import read_stream
    from tollway.events.broker import connect
    from tollway.events.schema import CallEvent

    async with httpx.AsyncClient(base_url=host.server.url, timeout=20) as c:
        r = await c.get("/search", headers={"x-user": "words", "x-request-id": "guarded-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "guarded-1"
    svc = host.gw.core.events
    assert svc is not None and svc.embedded is not None
    nc = await connect(svc.embedded.url)
    try:
        found: list[CallEvent] = []
        for _ in range(200):  # a hang detector
            found = [e for _, _, e in await read_stream(nc, "tollway.call.>", timeout=0.5)
                     if isinstance(e, CallEvent) and e.request_id == "guarded-1"]
            if found:
                break
        (event,) = found
        assert (event.tenant, event.endpoint, event.route, event.outcome,
                event.actual_cost_nanousd) == ("words", "search", "/search", "completed",
                                               4_000_000)
    finally:
        await nc.close()


@pytest.mark.parametrize("before", [True, False], ids=["before_last_bytes", "default"])
async def test_when_the_event_is_written_around_the_responses_last_bytes(before: bool) -> None:
    """``event_before_last_bytes=True``, as the pipeline does its own calls: when the last
    body message reaches the server, the call is settled and recorded (its event in the
    outbox), also for a streamed response; a process killed once its client has the
    answer loses no event. By default the record follows the last bytes at once: written
    when the server's ``send`` returns, before the request's ASGI call does."""
    from starlette.responses import StreamingResponse

    async def parts() -> Any:
        for part in (b"one ", b"two ", b"three"):
            yield part

    async def streamed(request: Request) -> Response:
        return StreamingResponse(parts(), media_type="text/plain")

    recorder = ListRecorder()
    cfg = make_config("http://127.0.0.1:9/v1", tenants=[_tenant("words", daily_usd=1000.0)])
    gw = tollway.Gateway(cfg, env=gateway_env(), recorder=recorder)
    app = Starlette(
        routes=[Route("/search", search), Route("/stream", streamed)],
        middleware=[Middleware(tollway.GuardMiddleware, gateway=gw,
                               tenant=lambda scope: "words", cost=lambda scope: SEARCH_USD,
                               event_before_last_bytes=before)])
    async with gw:
        for path in ("/search", "/stream"):
            before_n = len(recorder.records)
            returned: list[int] = []
            seen = await _call_once(app, path, recorder, returned)
            # (last, records so far) as each body message reached the server
            assert seen[-1] == (True, before_n + 1 if before else before_n), (path, seen)
            assert all(n == before_n for last, n in seen if not last)  # not before the end
            assert returned == [before_n + 1]  # written once the last send returned
            (rec,) = recorder.records[before_n:]
            assert (rec.outcome, rec.status, rec.actual_cost_nanousd) == (
                "completed", 200, 4_000_000)


async def test_without_events_the_processs_own_book_holds_the_day_and_refuses_past_it(
        ) -> None:
    """No NATS: the gateway's local budget decides at once (no await), holds each call's
    cost, settles it when the route answers and refuses the call that would pass the day."""
    recorder = ListRecorder()
    cfg = make_config("http://127.0.0.1:9/v1", tenants=[_tenant("thrifty", daily_usd=0.01)])
    gw = tollway.Gateway(cfg, env=gateway_env(), recorder=recorder)
    app = host_app(gw)
    async with gw:
        book = gw.core.budget_book()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://host") as client:
            for _ in range(2):  # 0.008 of 0.01 USD
                ok = await client.get("/search", headers={"x-user": "thrifty"})
                assert ok.status_code == 200, ok.text
                assert book.reserved_today("thrifty") == 0  # settled, not still held
            refused = await client.get("/search", headers={"x-user": "thrifty"})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert "daily budget" in refused.json()["error"]["message"]
    assert book.spent_today("thrifty") == 2 * 4_000_000
    assert [(r.outcome, r.actual_cost_nanousd) for r in recorder.records] == [
        ("completed", 4_000_000), ("completed", 4_000_000), ("rejected", 0)]


async def _call_once(app: Starlette, path: str, recorder: ListRecorder,
                     returned: list[int] | None = None) -> list[tuple[bool, int]]:
    """GET ``path`` of ``app`` at the ASGI level: (last, records so far) as each body
    message reached the server; ``returned`` gets the records so far when the server's
    ``send`` of the last body message has returned, at the caller's next step (as a
    server's next request would see them)."""
    seen: list[tuple[bool, int]] = []
    asked: list[bool] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            last = not message.get("more_body")
            seen.append((last, len(recorder.records)))
            if last and returned is not None:
                asyncio.get_running_loop().call_soon(
                    lambda: returned.append(len(recorder.records)))

    async def receive() -> Any:
        if not asked:  # the request, then a client that stays (never disconnects)
            asked.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    await asyncio.sleep(0)  # the loop's next step: ``returned``'s callback runs
    return seen


async def test_a_call_is_counted_once_even_when_writing_its_record_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics take a call after its last bytes; a record that cannot be written (a
    bug) still ends the call once: its budget hold settled once, the client answered."""
    recorder = ListRecorder()
    cfg = make_config("http://127.0.0.1:9/v1", tenants=[_tenant("words", daily_usd=1000.0)])
    gw = tollway.Gateway(cfg, env=gateway_env(), recorder=recorder)
    app = Starlette(routes=[Route("/search", search)], middleware=[
        Middleware(tollway.GuardMiddleware, gateway=gw, tenant=lambda scope: "words",
                   cost=lambda scope: SEARCH_USD)])
    registry = gw.core.metrics.registry

    def spent() -> float:
        return registry.get_sample_value("tollway_cost_usd_total",
                                         {"tenant": "words", "model": ""}) or 0.0

    async with gw:
        seen = await _call_once(app, "/search", recorder)
        assert seen == [(True, 0)]  # by default the record follows the last bytes
        assert len(recorder.records) == 1 and spent() == pytest.approx(SEARCH_USD)
        finished: list[int] = []
        pipeline = gw.core.pipeline
        finish = pipeline.finish

        def counted(call: Any) -> None:
            finished.append(1)
            finish(call)

        def broken(call: Any) -> Any:
            raise RuntimeError("a bug in the record")

        monkeypatch.setattr(pipeline, "finish", counted)
        monkeypatch.setattr(pipeline, "record", broken)
        with pytest.raises(RuntimeError, match="a bug in the record"):
            await _call_once(app, "/search", recorder)
        assert finished == [1]  # settled once, not again as the error unwound
        assert len(recorder.records) == 1 and spent() == pytest.approx(SEARCH_USD)
