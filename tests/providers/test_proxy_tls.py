"""Proxies (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) and a provider's own CA bundle, on loopback.

A tiny real proxy sends every host name to the scripted upstream, so the client
can name a host that only the proxy "resolves" (as behind a company proxy).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from yarl import URL

from support import gateway_env, make_raw_config
from tollway.config import ConfigError, parse_config
from tollway.errors import UpstreamConnectFailed
from tollway.providers import build_providers
from tollway.providers.http import CLIENTS, Timeouts, make_client
from tollway.providers.http.proxy import Proxies
from tollway.testing.scripted import CLOSE, Request, ScriptedUpstream, ok

SECRET = "pw-secret-31337"
HOST = "upstream.test"  # resolvable only by the proxy
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream-99"}


class TinyProxy:
    """CONNECT tunnels and absolute-form forwarding, every host mapped to one port."""

    def __init__(self, target_port: int, *, refuse: bool = False) -> None:
        self.target_port = target_port
        self.refuse = refuse
        self.heads: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TinyProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    def url(self) -> str:
        return f"http://user:{SECRET}@127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            if self.refuse:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Content-Length: 0\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            if head.startswith(b"CONNECT "):
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            else:
                up_writer.write(head)  # absolute-form, as received: the upstream accepts it
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


def answer(req: Request) -> list[bytes | float]:
    return [ok(b'{"line":"' + req.request_line + b'"}')]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_up(ca: trustme.CA) -> Iterator[ScriptedUpstream]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_ctx)
    with ScriptedUpstream(answer, ssl_context=server_ctx) as up:
        yield up


@pytest.fixture
def plain_up() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream(answer) as up:
        yield up


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def proxy(request: pytest.FixtureRequest) -> AsyncIterator[TinyProxy]:
    up: ScriptedUpstream = request.getfixturevalue(request.param)
    async with TinyProxy(up.port) as p:
        yield p


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("proxy", ["tls_up"], indirect=True)
async def test_https_through_a_connect_tunnel_trusting_the_providers_ca(
        kind: str, proxy: TinyProxy, tls_up: ScriptedUpstream, ca_file: str) -> None:
    env = {"HTTPS_PROXY": proxy.url(), "NO_PROXY": "example.org,.internal"}
    client = make_client(kind, "p", Timeouts(2, 2, 5), 10, ca_file=ca_file, env=env)
    try:
        for _ in range(3):
            reply = await client.request("POST", URL(tls_up.url(host=HOST)), b"{}", HEADERS)
            assert reply.status == 200
            assert reply.body == b'{"line":"POST /v1/chat/completions HTTP/1.1"}'
    finally:
        await client.aclose()
    (head,) = proxy.heads  # one tunnel, reused
    assert head.startswith(b"CONNECT %s:%d HTTP/1.1\r\n" % (HOST.encode(), tls_up.port))
    assert b"Proxy-Authorization: " + basic("user", SECRET) in head
    assert b"sk-upstream-99" not in head  # the upstream's key goes inside the tunnel only


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("proxy", ["tls_up"], indirect=True)
async def test_an_untrusted_certificate_is_a_clear_error(
        kind: str, proxy: TinyProxy, tls_up: ScriptedUpstream) -> None:
    client = make_client(kind, "p", Timeouts(2, 2, 5), 10, env={"HTTPS_PROXY": proxy.url()})
    try:
        with pytest.raises(UpstreamConnectFailed, match="TLS") as err:
            await client.request("POST", URL(tls_up.url(host=HOST)), b"{}", HEADERS)
    finally:
        await client.aclose()
    assert SECRET not in str(err.value) and "sk-upstream" not in str(err.value)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("proxy", ["plain_up"], indirect=True)
async def test_http_through_a_proxy_in_absolute_form(
        kind: str, proxy: TinyProxy, plain_up: ScriptedUpstream) -> None:
    client = make_client(kind, "p", Timeouts(2, 2, 5), 10, env={"http_proxy": proxy.url()})
    try:
        reply = await client.request("POST", URL(plain_up.url(host=HOST)), b"{}", HEADERS)
    finally:
        await client.aclose()
    line = b"POST http://%s:%d/v1/chat/completions HTTP/1.1" % (HOST.encode(), plain_up.port)
    assert reply.body == b'{"line":"' + line + b'"}'
    assert basic("user", SECRET) in proxy.heads[0]


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("proxy", ["plain_up"], indirect=True)
async def test_loopback_never_goes_through_the_proxy(
        kind: str, proxy: TinyProxy, plain_up: ScriptedUpstream) -> None:
    env = {"HTTP_PROXY": proxy.url(), "HTTPS_PROXY": proxy.url()}
    client = make_client(kind, "p", Timeouts(2, 2, 5), 10, env=env)
    try:
        reply = await client.request("POST", URL(plain_up.url()), b"{}", HEADERS)
    finally:
        await client.aclose()
    assert reply.body == b'{"line":"POST /v1/chat/completions HTTP/1.1"}'
    assert proxy.heads == []


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("proxy", ["tls_up"], indirect=True)
async def test_a_refused_tunnel_names_the_status_never_the_credentials(
        kind: str, proxy: TinyProxy, tls_up: ScriptedUpstream, ca_file: str) -> None:
    proxy.refuse = True
    client = make_client(kind, "p", Timeouts(2, 2, 5), 10, ca_file=ca_file,
                         env={"HTTPS_PROXY": proxy.url()})
    try:
        with pytest.raises(UpstreamConnectFailed, match="407") as err:
            await client.request("POST", URL(tls_up.url(host=HOST)), b"{}", HEADERS)
    finally:
        await client.aclose()
    assert SECRET not in str(err.value) and "user" not in str(err.value)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_body_without_length_over_tls_ends_on_the_close(
        kind: str, ca: trustme.CA, ca_file: str) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    body = b'{"until":"close"}'
    with ScriptedUpstream(lambda req: [b"HTTP/1.1 200 OK\r\n\r\n" + body, CLOSE],
                          ssl_context=server_ctx) as up:
        client = make_client(kind, "p", Timeouts(2, 2, 5), 10, ca_file=ca_file, env={})
        try:
            for _ in range(2):
                reply = await client.request("POST", URL(up.url(host="localhost")), b"{}",
                                             HEADERS)
                assert (reply.status, reply.body) == (200, body)
        finally:
            await client.aclose()
    assert up.connections == 2


def test_no_proxy_rules() -> None:
    proxies = Proxies.from_env({"HTTPS_PROXY": "http://proxy:3128",
                                "NO_PROXY": "internal, .corp.example, api.x.com:8443, 10.0.0.0/8"})
    routed = {host_port: proxies.for_url("https", *host_port) is not None for host_port in [
        ("api.openai.com", 443), ("internal", 443), ("a.internal", 443),
        ("corp.example", 443), ("b.corp.example", 443), ("api.x.com", 8443),
        ("api.x.com", 443), ("10.1.2.3", 443), ("127.0.0.1", 443), ("localhost", 443),
        ("::1", 443)]}
    assert routed == {("api.openai.com", 443): True, ("internal", 443): False,
                      ("a.internal", 443): False, ("corp.example", 443): False,
                      ("b.corp.example", 443): False, ("api.x.com", 8443): False,
                      ("api.x.com", 443): True, ("10.1.2.3", 443): False,
                      ("127.0.0.1", 443): False, ("localhost", 443): False,
                      ("::1", 443): False}
    assert proxies.for_url("http", "api.openai.com", 80) is None  # no HTTP_PROXY set
    assert Proxies.from_env({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}).for_url(
        "https", "api.openai.com", 443) is None


def test_a_bad_proxy_variable_never_shows_its_password() -> None:
    with pytest.raises(ValueError, match="HTTP") as err:
        Proxies.from_env({"HTTPS_PROXY": f"https://user:{SECRET}@proxy:3128"})
    assert SECRET not in str(err.value)
    assert SECRET not in repr(Proxies.from_env({"HTTPS_PROXY": f"http://u:{SECRET}@p:1"}).for_url(
        "https", "api.openai.com", 443))


def test_an_unusable_proxy_variable_is_a_config_error_at_startup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"https://user:{SECRET}@proxy.corp:3128")
    config = parse_config(make_raw_config("https://api.example.com/v1"), env=gateway_env())
    with pytest.raises(ConfigError, match="HTTP\\(S\\)_PROXY") as err:
        build_providers(config.providers, gateway_env())
    assert SECRET not in str(err.value) and "'fake'" in str(err.value)


def test_config_checks_ca_file_and_http_client(ca_file: str, tmp_path: Path) -> None:
    def load(**provider: object) -> None:
        raw = make_raw_config("https://api.example.com/v1")
        raw["providers"][0].update(provider)
        parse_config(raw, source="t.toml", env=gateway_env())

    load(ca_file=ca_file)  # a readable bundle is accepted
    with pytest.raises(ConfigError, match=r"providers\[0\]\.ca_file"):
        load(ca_file=str(tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a readable PEM CA bundle"):
        load(ca_file=str(tmp_path / "junk.pem"))
    with pytest.raises(ConfigError, match=r"providers\[0\]\.http_client.*protocol suite"):
        load(http_client="aiohttp")
