"""Running an app on uvicorn with uvloop and httptools, on a socket bound here.

The HTTP protocol is httptools' with the limits and deadlines of ``[server]``
(:mod:`tollway.protocol`).

Binding the socket ourselves lets ``--port 0`` work (the real port is known
before the first request) and lets callers print it once the server is up.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette

from tollway.config import ServerConfig
from tollway.gateway import Gateway
from tollway.protocol import protocol_class

log = logging.getLogger("tollway.server")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def uvicorn_config(app: Any, server: ServerConfig, *, log_level: str = "info",
                   on_refused: Callable[[str], None] | None = None,
                   **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for the gateway: uvloop, httptools with the limits and deadlines of
    ``server`` (:mod:`tollway.protocol`); ``on_refused(reason)`` counts each refusal."""
    options: dict[str, Any] = {
        "loop": "uvloop",
        "http": protocol_class(server, on_refused),
        "ws": "none",  # no route upgrades; an upgraded connection would leave the protocol
        "lifespan": "on",
        "access_log": False,  # tollway writes its own JSON line per request
        "log_config": None,  # logging is configured by tollway.logs
        "log_level": log_level,
        "server_header": False,
        # The client address counts for the admin sign-in throttle only, and tollway reads
        # X-Forwarded-For itself, from [server] trusted_proxies (tollway.auth.ClientAddress).
        "proxy_headers": False,
        "timeout_keep_alive": server.keepalive_timeout_s,
        # SIGTERM: stop accepting, let in-flight calls and streams end, cut the rest.
        "timeout_graceful_shutdown": server.drain_timeout_s,
        "backlog": 4096,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def make_server(app: Any, server: ServerConfig, log_level: str = "info",
                on_refused: Callable[[str], None] | None = None) -> uvicorn.Server:
    return uvicorn.Server(uvicorn_config(app, server, log_level=log_level,
                                         on_refused=on_refused))


# Files the gateway opens besides client connections: provider connections, NATS, the outbox.
FD_RESERVE = 256


def raise_fd_limit(max_connections: int) -> int:
    """Lift the soft limit on open files to the hard one (as Go's runtime does at start-up),
    and warn when it stays below ``max_connections`` plus :data:`FD_RESERVE`: most Linux
    systems start processes at 1024, where the gateway would run out of descriptors before
    its connection cap, and fail accepts instead of answering 503. Returns the soft limit."""
    try:
        import resource
    except ImportError:  # not on Windows
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < max_connections + FD_RESERVE:
        log.warning("the open-file limit is below [server] max_connections plus what the "
                    "gateway opens itself: past it, connections fail instead of getting 503",
                    extra={"nofile": soft, "max_connections": max_connections,
                           "reserve": FD_RESERVE})
    return soft


def serve(app: Starlette, sock: socket.socket, *, log_level: str = "info",
          on_ready: Callable[[], None] | None = None) -> None:
    """Serve the gateway's app (:func:`tollway.create_app`) until SIGINT/SIGTERM, with the
    limits of its ``[server]`` config; ``on_ready`` runs once the server accepts requests."""
    gateway: Gateway = app.state.gateway
    metrics = gateway.metrics

    def refused(reason: str) -> None:
        metrics.rejections.inc((reason,))

    raise_fd_limit(gateway.config.server.max_connections)
    server = make_server(app, gateway.config.server, log_level, refused)

    def wait_ready() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            # Everything built at start-up (config, catalog, app, middleware,
            # clients) lives as long as the process: moving it out of the
            # collector's generations keeps a full collection from pausing
            # requests for tens of milliseconds.
            gc.collect()
            gc.freeze()
            if on_ready is not None:
                on_ready()

    threading.Thread(target=wait_ready, daemon=True).start()
    server.run(sockets=[sock])
