"""Running an app on uvicorn with uvloop and httptools, on a socket bound here.

Binding the socket ourselves lets ``--port 0`` work (the real port is known
before the first request) and lets callers print it once the server is up.
"""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def make_server(app: Any, log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # tollway writes its own JSON line per request
        log_config=None,  # logging is configured by tollway.logs
        log_level=log_level,
        server_header=False,
        proxy_headers=False,  # tollway does not use the client address
        timeout_graceful_shutdown=10,
        backlog=4096,
    )
    return uvicorn.Server(config)


def serve(app: Any, sock: socket.socket, *, log_level: str = "info",
          on_ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; ``on_ready`` runs once the server accepts requests."""
    server = make_server(app, log_level)

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
