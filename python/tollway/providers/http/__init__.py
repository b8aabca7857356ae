"""The HTTP client behind the providers: one protocol, implementations chosen by name.

:class:`HttpClient` is everything a provider needs: a whole request, a
streamed request, and close (the types live in :mod:`.protocol`, a leaf the
clients import; this package re-exports them). An implementation must pass the
protocol test suite (``tests/providers/test_protocol.py``) before it may be
chosen. Today that is ``raw``, tollway's own HTTP/1.1 client (:mod:`.raw`; its README says what of
HTTP/1.1 it implements and what not). The project's README says why a
maintained client is not the default: aiohttp failed the suite, pyreqwest costs
1.7-1.9x the CPU per call. A client takes proxies from ``HTTPS_PROXY`` /
``HTTP_PROXY`` / ``NO_PROXY`` (:mod:`.proxy`) and an optional CA bundle
(:mod:`.tls`). Transport failures come out as tollway's own upstream errors, so
callers never see a library's exception type; their messages name the provider
and never a header, a key or a proxy's credentials.
"""

from __future__ import annotations

from collections.abc import Mapping

from tollway.providers.http.protocol import HttpClient, Reply, StreamReply, Timeouts

# The clients a provider may name in `http_client`: each passes the protocol suite,
# which runs over this tuple; config validation refuses any other name.
CLIENTS = ("raw",)
DEFAULT_CLIENT = "raw"


def make_client(kind: str, name: str, timeouts: Timeouts, max_connections: int, *,
                keepalive_s: float = 4.0, ca_file: str | None = None,
                env: Mapping[str, str] | None = None) -> HttpClient:
    """The client called ``kind`` (one of :data:`CLIENTS`) for the provider ``name``.

    ``env`` holds the proxy variables (default: the process environment).
    """
    from tollway.providers.http.proxy import Proxies
    from tollway.providers.http.tls import tls_context

    proxies = Proxies.from_env(env)
    # Without a bundle the client makes the default context on its first https
    # connection: loading the system's CAs costs tens of milliseconds.
    ssl_context = tls_context(ca_file) if ca_file is not None else None
    if kind == "raw":
        from tollway.providers.http.raw import RawHttpClient

        return RawHttpClient(name, timeouts, max_connections, keepalive_s=keepalive_s,
                             ssl_context=ssl_context, proxies=proxies)
    raise ValueError(f"unknown http_client {kind!r}; one of {', '.join(CLIENTS)}")


__all__ = ["CLIENTS", "DEFAULT_CLIENT", "HttpClient", "Reply", "StreamReply", "Timeouts",
           "make_client"]
