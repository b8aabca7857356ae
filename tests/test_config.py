"""Config: TOML into structs, built-ins, and errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import gateway_env, make_raw_config
from tollway.app import create_app
from tollway.config import (
    OPENAI_BASE_URL,
    ConfigError,
    default_config,
    load_config,
    missing_secrets,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "tollway.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tollway.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_enable_providers_from_env() -> None:
    cfg = default_config(env={"OPENAI_API_KEY": "sk-x", "LOCAL_OPENAI_URL": "http://h:1/v1/"})
    names = {p.name: p for p in cfg.providers}
    assert set(names) == {"openai", "local"}
    assert names["openai"].base_url == OPENAI_BASE_URL
    assert names["local"].local is True and names["local"].base_url == "http://h:1/v1"
    assert names["local"].api_key_env is None  # LOCAL_API_KEY not set: no key needed
    ids = {m.id for m in cfg.models}
    assert "gpt-4o-mini" in ids  # from the built-in price table
    assert not any("/" in m for m in ids)  # OpenRouter's models need OPENROUTER_API_KEY
    assert [r.alias for r in cfg.routes] == ["auto"]
    assert set(cfg.tiers) == {"low", "standard", "premium"}
    assert cfg.tiers["low"].max_call_usd == 0.002 and cfg.tiers["premium"].daily_usd == 10.0


def test_defaults_with_empty_env_have_no_providers_or_models() -> None:
    cfg = default_config(env={})
    assert cfg.providers == [] and cfg.models == [] and cfg.routes == []


def test_openrouter_builtin_has_attribution_headers_from_env() -> None:
    cfg = default_config(env={"OPENROUTER_API_KEY": "k", "OPENROUTER_X_TITLE": "acme app"})
    (p,) = cfg.providers
    assert p.name == "openrouter" and p.x_title == "acme app" and p.http_referer is None
    assert any(m.id.startswith("openai/") for m in cfg.models)


def test_file_overrides_builtin_model_price_and_merges_tiers() -> None:
    raw = make_raw_config("http://127.0.0.1:1/v1", tiers={"standard": {"max_call_usd": 0.5}})
    cfg = parse_config(raw, env=gateway_env())
    assert cfg.tiers["standard"].max_call_usd == 0.5
    assert cfg.tiers["standard"].daily_usd == 1.0  # the other field keeps its default
    fast = next(m for m in cfg.models if m.id == "fast")
    assert fast.upstream == "gpt-4o-mini"
    mini = next(m for m in cfg.models if m.id == "gpt-4o-mini")
    assert mini.upstream == "gpt-4o-mini"  # defaults to the id


def test_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.server.port == 8080
    assert {t.id for t in cfg.tenants} == {"acme"}


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ('[server]\nport = "eighty"\n', "$.server.port", "Expected `int`"),
        ("[server]\nport = 70000\n", "$.server.port", "<= 65535"),
        ('[server]\ntrusted_proxies = ["10.0.0.0/8", "proxy.local"]\n', "$.server",
         "'proxy.local' is not an IP address or network"),
        ('[server]\nadmin_key_evn = "X"\n', "$.server", "unknown field `admin_key_evn`"),
        ('[[tenants]]\nid = "acme"\ntier = "gold"\n', "$.tenants[0].tier", "unknown tier"),
        ('[[tenants]]\nid = "a.b"\n', "$.tenants[0].id", "matching regex"),
        ('[[tenants]]\nid = "a"\nkey_sha256 = ["abc"]\n', "$.tenants[0].key_sha256[0]",
         "matching regex"),
        ('[[models]]\nid = "m"\nprovider = "nowhere"\n', "$.models[0].provider",
         "not configured"),
        ('[[routes]]\nalias = "fast-route"\ncandidates = ["nope"]\n',
         "$.routes[0].candidates[0]", "not configured"),
        ('[[routes]]\nalias = "r"\ncandidates = []\n', "$.routes[0].candidates",
         "length >= 1"),
        ('[[providers]]\nname = "p"\nbase_url = "ftp://x"\n', "$.providers[0].base_url",
         "http://"),
        ('[[providers]]\nname = "p"\n', "$.providers[0]", "missing required field `base_url`"),
        ('[[tenants]]\nid = "a"\nmodels = ["ghost"]\n', "$.tenants[0].models[0]",
         "unknown model"),
    ],
)
def test_config_error_names_file_and_field(
    tmp_path: Path, text: str, path: str, words: str
) -> None:
    file = write(tmp_path, "[server]\nbuiltin_providers = false\n" + text
                 if not text.startswith("[server]") else text)
    with pytest.raises(ConfigError) as err:
        load_config(file, env={})
    assert err.value.source == str(file)
    assert err.value.path == path
    assert words in str(err.value)
    assert str(file) in str(err.value) and path in str(err.value)


def test_duplicate_key_hash_across_tenants_is_refused(tmp_path: Path) -> None:
    h = "a" * 64
    file = write(tmp_path, f'[[tenants]]\nid = "a"\nkey_sha256 = ["{h}"]\n'
                           f'[[tenants]]\nid = "b"\nkey_sha256 = ["{h.upper()}"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(file, env={})
    assert err.value.path == "$.tenants[1].key_sha256[0]"
    assert "already used by tenant 'a'" in str(err.value)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    file = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as err:
        load_config(file, env={})
    assert str(file) in str(err.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})


def test_missing_secret_refuses_to_start() -> None:
    raw = make_raw_config("http://127.0.0.1:1/v1")
    cfg = parse_config(raw, env={})
    assert missing_secrets(cfg, env={}) == ["FAKE_API_KEY"]
    with pytest.raises(ConfigError, match="FAKE_API_KEY"):
        create_app(cfg, env={})
    create_app(cfg, env=gateway_env())  # and starts once it is set


def test_nats_url_is_one_url_or_a_clusters_list(tmp_path: Path) -> None:
    for url, want in (('"embedded"', "embedded"), ('"nats://h1:4222"', "nats://h1:4222"),
                      ('["nats://h1:4222", "h2:4222", "tls://h3:4222"]',
                       ["nats://h1:4222", "h2:4222", "tls://h3:4222"])):
        cfg = load_config(write(tmp_path, f"[nats]\nurl = {url}\n[events]\nreplicas = 3\n"),
                          env={})
        assert cfg.nats.url == want and cfg.events.replicas == 3
    for url, path, words in (('[]', "$.nats.url", "at least one"),
                             ('["nats://h1:4222", "embedded"]', "$.nats.url[1]", "embedded"),
                             ('"http://h1:4222"', "$.nats.url", "not http://"),
                             ('["nats://a:1", "redis://b:2"]', "$.nats.url[1]", "redis")):
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, f"[nats]\nurl = {url}\n"), env={})
        assert err.value.path == path and words in str(err.value)
