"""Which proxy, if any, a request goes through: ``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``.

The variables are read once, when a client is made (as curl and requests do per
process). Loopback upstreams (a local vLLM, tests) never go through a proxy, and
``NO_PROXY`` lists host names (a leading dot or ``*.`` matches subdomains),
``host:port`` entries, IP addresses and CIDR blocks, or ``*`` for everything.
Credentials in a proxy URL (``http://user:pass@proxy:3128``) become a
``Proxy-Authorization`` header; :class:`Proxy` never shows them in its ``repr``.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping

from yarl import URL

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class Proxy:
    """One proxy: where to connect, and the header that authenticates to it."""

    __slots__ = ("authorization", "host", "port")

    def __init__(self, url: URL) -> None:
        if url.scheme != "http" or not url.host:
            # An https:// proxy would need TLS to the proxy and TLS inside it; none of the
            # clients does that alike, so it is refused rather than half-supported.
            raise ValueError("proxy URLs must be http://host:port")
        self.host = url.host
        self.port = url.port or 80
        self.authorization: str | None = None
        if url.user is not None:
            pair = f"{url.user}:{url.password or ''}".encode()
            self.authorization = "Basic " + base64.b64encode(pair).decode()

    def __repr__(self) -> str:
        return f"Proxy({self.host}:{self.port})"


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Proxies:
    """The proxy settings of one client."""

    __slots__ = ("_http", "_https", "_no_proxy")

    def __init__(self, http: Proxy | None, https: Proxy | None, no_proxy: str = "") -> None:
        self._http = http
        self._https = https
        self._no_proxy = [e.strip().lower() for e in no_proxy.split(",") if e.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Proxies:
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name.lower()) or env.get(name.upper()) or ""

        http, https = get("http_proxy"), get("https_proxy")
        try:
            return cls(Proxy(URL(http)) if http else None, Proxy(URL(https)) if https else None,
                       get("no_proxy"))
        except ValueError as exc:
            # Never echo the variable: it may hold the proxy's password.
            raise ValueError(f"HTTP(S)_PROXY: {exc}") from None

    def for_url(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self._https if scheme == "https" else self._http
        if proxy is None or _is_loopback(host) or self._bypassed(host.lower(), port):
            return None
        return proxy

    def _bypassed(self, host: str, port: int) -> bool:
        for entry in self._no_proxy:
            if entry == "*":
                return True
            name, _, want_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if want_port and want_port != str(port):
                continue
            name = name.removeprefix("*").lstrip(".")
            if host == name or host.endswith("." + name):
                return True
            try:
                if ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(name,
                                                                                 strict=False):
                    return True
            except ValueError:
                pass
        return False
