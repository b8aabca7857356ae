"""Auth: bearer key -> tenant by SHA-256, deny by default, admin key, tenant isolation."""

from __future__ import annotations

import httpx
import pytest

from support import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    ListRecorder,
    Server,
    auth,
    chat_body,
    gateway_env,
    make_config,
)
from tollway.app import create_app
from tollway.auth import PUBLIC_PATHS, ClientAddress, KeyIndex, bearer, hash_key, new_key
from tollway.testing.upstream import FakeUpstream

CHAT = "/api/ai/v1/chat/completions"


def test_hash_and_new_key() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    a, b = new_key(), new_key()
    assert a != b and a.startswith("tw-") and len(a) > 40


@pytest.mark.parametrize(
    ("header", "key"),
    [(b"Bearer abc", "abc"), (b"bearer  abc ", "abc"), (b"Basic abc", None), (b"Bearer", None),
     (b"Bearer ", None), (None, None), (b"Bearer \xff\xfe", None), (b"Bearer " + b"k" * 600, None)],
)
def test_bearer_parsing(header: bytes | None, key: str | None) -> None:
    assert bearer(header) == key


def test_key_index_resolves_tenants_and_admin() -> None:
    keys = KeyIndex(make_config("http://127.0.0.1:1/v1"), {"TOLLWAY_ADMIN_KEY": ADMIN_KEY})
    acme = keys.resolve(ACME_KEY)
    assert acme is not None and acme.tenant_id == "acme" and not acme.admin
    admin = keys.resolve(ADMIN_KEY)
    assert admin is not None and admin.admin and admin.tenant is None
    assert keys.resolve("tw-unknown") is None
    assert keys.resolve(hash_key(ACME_KEY)) is None  # the hash itself is not a key
    no_admin = KeyIndex(make_config("http://127.0.0.1:1/v1"), {})
    assert not no_admin.admin_enabled and no_admin.resolve(ADMIN_KEY) is None


def test_missing_and_bad_keys_are_401(client: httpx.Client, upstream: FakeUpstream) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Token x"},
                    auth(hash_key(ACME_KEY))):
        r = client.post(CHAT, json=chat_body(), headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "nope" not in r.text
    assert upstream.requests == []


def test_deny_by_default_public_paths_open(client: httpx.Client) -> None:
    for path in sorted(PUBLIC_PATHS):
        assert client.get(path).status_code == 200, path
    # Unknown paths need a key too: nothing is open by accident.
    assert client.get("/api/ai/anything").status_code == 401
    assert client.get("/api/ai/health/").status_code == 401
    assert client.get("/api/ai/v1/models").status_code == 401
    assert client.get("/api/ai/providers").status_code == 401


def test_admin_endpoints_need_the_admin_key(client: httpx.Client) -> None:
    r = client.get("/api/ai/providers", headers=auth(ACME_KEY))
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    assert client.post("/api/ai/providers/fake/test", headers=auth(ACME_KEY)).status_code == 403
    assert client.get("/api/ai/providers", headers=auth(ADMIN_KEY)).status_code == 200


def test_tenant_allow_list_and_records_keep_tenants_apart(
    client: httpx.Client, recorder: ListRecorder
) -> None:
    r = client.post(CHAT, json=chat_body(model="gpt-4o-mini"), headers=auth(GLOBEX_KEY))
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    # The low tier's per-call cap (0.002 USD) needs an output bound below the default 1024.
    assert client.post(CHAT, json=chat_body(model="fast", max_tokens=256),
                       headers=auth(GLOBEX_KEY)).is_success
    assert client.post(CHAT, json=chat_body(), headers=auth(ACME_KEY)).is_success
    recs = recorder.wait(3)
    assert [(r.tenant, r.outcome) for r in recs] == [
        ("globex", "rejected"), ("globex", "completed"), ("acme", "completed")]
    assert recs[1].tier == "low" and recs[2].tier == "standard"


@pytest.mark.parametrize(("peer", "fields", "counted"), [
    # not from a trusted proxy: its X-Forwarded-For is the client's word, ignored
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
    # through one proxy: what it saw connect
    ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
    # entries left of it are the client's own, whatever they say
    ("10.0.0.5", ["10.9.9.9, 192.0.2.66, 198.51.100.1"], "198.51.100.1"),
    # through two proxies (the outer one appended the client, the inner one the outer)
    ("10.0.0.5", ["198.51.100.1, 10.1.1.1"], "198.51.100.1"),
    ("::1", ["198.51.100.1", "2001:db8::7"], "2001:db8::7"),  # two fields: one list
    ("10.0.0.5", [], "10.0.0.5"),  # no header: the proxy itself
    ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),  # IPv4 on a dual-stack socket
    ("10.0.0.5", ["10.2.2.2, 10.1.1.1"], "10.2.2.2"),  # only proxies: the outermost
    ("10.0.0.5", ["not-an-address"], "not-an-address"),  # still one address to count
])
def test_the_client_address_behind_trusted_proxies(peer: str, fields: list[str],
                                                   counted: str) -> None:
    address = ClientAddress(["10.0.0.0/8", "::1"])
    headers = [(b"x-forwarded-for", f.encode()) for f in fields]
    assert address((peer, 4321), [(b"host", b"x"), *headers]) == counted
    assert ClientAddress()((peer, 4321), headers) == peer  # none trusted: the connection's


def _guessed(client: httpx.Client, address: str, times: int) -> list[int]:
    return [client.get("/api/ai/providers", headers={
        **auth(f"tw-guess-{i}"), "X-Forwarded-For": address}).status_code
        for i in range(times)]


def test_behind_a_trusted_proxy_a_guessing_client_locks_out_only_itself() -> None:
    with FakeUpstream() as up:
        cfg = make_config(up.base_url, server={
            "builtin_providers": False, "builtin_models": False,
            "admin_sign_in_failures_per_minute": 3, "trusted_proxies": ["127.0.0.0/8"]})
        with Server(create_app(cfg, env=gateway_env())) as server, \
                httpx.Client(base_url=server.url) as client:
            assert _guessed(client, "198.51.100.1", 4) == [401, 401, 401, 429]
            admin = auth(ADMIN_KEY)
            assert client.get("/api/ai/providers", headers={
                **admin, "X-Forwarded-For": "198.51.100.1"}).status_code == 429
            # Another client through the same proxy still signs in.
            assert client.get("/api/ai/providers", headers={
                **admin, "X-Forwarded-For": "198.51.100.2"}).status_code == 200
            # A forged entry left of the proxy's does not move the guesser elsewhere.
            assert client.get("/api/ai/providers", headers={
                **auth("tw-guess"), "X-Forwarded-For": "192.0.2.1, 198.51.100.1"}
                ).status_code == 429


def test_without_trusted_proxies_x_forwarded_for_moves_no_one() -> None:
    with FakeUpstream() as up:
        cfg = make_config(up.base_url, server={
            "builtin_providers": False, "builtin_models": False,
            "admin_sign_in_failures_per_minute": 3})
        with Server(create_app(cfg, env=gateway_env())) as server, \
                httpx.Client(base_url=server.url) as client:
            assert _guessed(client, "198.51.100.1", 3) == [401, 401, 401]
            # Claiming another address does not escape: the connection's is counted.
            assert _guessed(client, "198.51.100.2", 1) == [429]
