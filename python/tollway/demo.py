"""``tollway demo``: a simulated upstream and a gateway in front of it, ready to curl.

Needs no key and no config: the upstream is tollway's own simulated
OpenAI-compatible server (in this process, on its own thread and loop), and
the gateway gets a tenant ``demo`` with a freshly generated key, printed once.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
from typing import Any

from tollway.auth import hash_key, new_key
from tollway.config import builtin_models, parse_config
from tollway.logs import configure_logging
from tollway.server import bind, serve

_DEMO_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
_FALLBACK_PRICES = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00),
                    "text-embedding-3-small": (0.02, 0.0)}


def demo_config(upstream_url: str, key: str, host: str, port: int,
                data_dir: str | None = None) -> dict[str, Any]:
    prices = {m.id: (m.input_usd_per_mtok, m.output_usd_per_mtok) for m in builtin_models()}
    models = []
    for mid in _DEMO_MODELS:
        inp, out = prices.get(mid, _FALLBACK_PRICES[mid])
        models.append({"id": mid, "provider": "simulated", "input_usd_per_mtok": inp,
                       "output_usd_per_mtok": out,
                       "kind": "embedding" if "embedding" in mid else "chat"})
    return {
        "server": {"host": host, "port": port, "builtin_providers": False,
                   "builtin_models": False},
        # The embedded nats-server, on a scratch folder unless one is given:
        # every demo call becomes an event and /api/ai/usage works.
        "nats": ({"url": "embedded", "data_dir": data_dir} if data_dir
                 else {"enabled": False}),
        "providers": [{"name": "simulated", "base_url": upstream_url, "local": True}],
        "models": models,
        "routes": [{"alias": "auto", "candidates": ["gpt-4o-mini", "gpt-4o"]}],
        "tenants": [{"id": "demo", "tier": "standard", "key_sha256": [hash_key(key)]}],
    }


def curl_line(base: str, key: str) -> str:
    body = json.dumps({"model": "auto",
                       "messages": [{"role": "user", "content": "Hello from tollway"}]})
    return (f"curl -s {base}/api/ai/v1/chat/completions"
            f" -H {shlex.quote('Authorization: Bearer ' + key)}"
            f" -H 'Content-Type: application/json' -d {shlex.quote(body)}")


def run(host: str = "127.0.0.1", port: int = 8080, latency_ms: float = 0.0) -> int:
    from tollway.app import create_app
    from tollway.testing.upstream import FakeUpstream

    configure_logging("info")
    upstream = FakeUpstream(name="simulated", latency_s=latency_ms / 1000.0,
                            require_auth=False, record=False).start()
    key, admin_key = new_key(), new_key()
    sock = bind(host, port)
    real_port = sock.getsockname()[1]
    env = {"TOLLWAY_ADMIN_KEY": admin_key}
    data_dir = tempfile.mkdtemp(prefix="tollway-demo-")
    config = parse_config(demo_config(upstream.base_url, key, host, real_port, data_dir),
                          source="<demo>", env=env)
    app = create_app(config, env=env)
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{real_port}"

    def banner() -> None:
        print(f"tollway demo: gateway {base} -> simulated upstream {upstream.base_url}\n"
              f"  OpenAI base_url: {base}/api/ai/v1\n"
              f"  key (tenant demo, shown once): {key}\n"
              f"  admin key: {admin_key}\n"
              f"Try:\n{curl_line(base, key)}\n", flush=True)

    try:
        serve(app, sock, on_ready=banner)
    finally:
        upstream.stop()
        sock.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run())
