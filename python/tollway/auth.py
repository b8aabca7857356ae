"""API keys: bearer key -> tenant by SHA-256, and the admin key.

Keys are stored only as SHA-256 hex digests. Looking the digest up in a dict
is safe against timing attacks because the digest of an unknown key says
nothing about any stored key; the final comparison is constant-time anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Protocol
from urllib.parse import parse_qsl

from tollway.config import Config, TenantConfig
from tollway.errors import TollwayError

# Paths anyone may call; everything else needs a key (deny by default).
# The OpenAPI document is public too: it says nothing the source does not, and clients and
# tools (SDK generators, fuzzers) load it before they hold a key.
# The dashboard's page and assets too: they hold no data, and ask for the admin key.
PUBLIC_PATHS: Final = frozenset({"/api/ai/health", "/api/ai/ready", "/api/ai/metrics",
                                 "/api/ai/openapi.json", "/api/ai/dashboard",
                                 "/api/ai/dashboard/app.js", "/api/ai/dashboard/app.css"})
# Paths that need the admin key; /api/ai/admin/ before its routes exist (DESIGN.md, round 2),
# so none of them can be added open to tenants.
ADMIN_PREFIXES: Final = ("/api/ai/providers", "/api/ai/shadow", "/api/ai/admin/")

KEY_PREFIX: Final = "tw-"

# Query parameters that clients and libraries use for keys. A key in a URL lands in proxy and
# server logs and in browser history, so the gateway refuses it rather than ignore it: the
# caller learns the key must be replaced.
KEY_PARAMS: Final = frozenset({
    "api_key", "apikey", "api-key", "key", "access_token", "token", "auth", "authorization"})
# Bounds the work a hostile query string can cause (one SHA-256 per value checked).
_MAX_QUERY_FIELDS: Final = 100


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 bits of randomness, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer(header: bytes | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value, else None."""
    if not header:
        return None
    scheme, _, value = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    value = value.strip()
    if not value or len(value) > 512:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def key_in_query(query: bytes, keys: KeyIndex) -> str | None:
    """The name of a query parameter that carries an API key (by name or by a value that is
    a valid key), else None."""
    fields = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    for name, value in fields[:_MAX_QUERY_FIELDS]:
        if name.lower() in KEY_PARAMS or (
                8 <= len(value) <= 512 and keys.resolve(value) is not None):
            return name[:64]
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    """The address a request counts for: the connection's, or, when that is one of the
    ``trusted`` proxies, the rightmost ``X-Forwarded-For`` entry that is not (what the
    outermost trusted proxy saw connect to it; entries left of it are the client's word).
    Every ``X-Forwarded-For`` field counts, in order, as one list."""

    __slots__ = ("trusted",)

    def __init__(self, trusted: Sequence[str] = ()) -> None:
        self.trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(p, strict=False) for p in trusted)

    def _is_trusted(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 peer of a dual-stack socket ("::ffff:10.0.0.5")
        return any(ip in net for net in self.trusted)

    def __call__(self, client: tuple[str, int] | None,
                 headers: Iterable[tuple[bytes, bytes]]) -> str:
        host = client[0] if client else ""
        if not self.trusted or not self._is_trusted(host):
            return host
        hops = [hop.strip() for name, value in headers if name == b"x-forwarded-for"
                for hop in value.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            if not self._is_trusted(hop):
                return hop
            host = hop  # a trusted proxy further out: the next one left is who it saw
        return host


class SignInThrottle:
    """Failed sign-ins on the admin paths, per client address: after ``limit`` failures
    within ``window_s``, the address is refused until that window ends, whatever key it
    sends next (a guessing client learns nothing more). Bounded: past ``max_clients``
    addresses, the oldest windows are dropped."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.max_clients = max_clients
        self._windows: dict[str, list[float]] = {}  # host -> [window start, failures]

    def retry_after(self, host: str) -> float:
        """Seconds this address must wait, 0 when it may try."""
        w = self._windows.get(host)
        if w is None or w[1] < self.limit:
            return 0.0
        left = w[0] + self.window_s - self.clock()
        if left <= 0:
            del self._windows[host]
            return 0.0
        return left

    def failed(self, host: str) -> None:
        now = self.clock()
        w = self._windows.get(host)
        if w is None or now - w[0] >= self.window_s:
            if len(self._windows) >= self.max_clients:
                for old in sorted(self._windows, key=lambda h: self._windows[h][0])[
                        :self.max_clients // 10 or 1]:
                    del self._windows[old]
            self._windows[host] = [now, 1.0]
        else:
            w[1] += 1


class Principal:
    """Who is calling: a tenant, or the operator holding the admin key.

    ``key_id``: the directory key used (empty for config keys and the admin key);
    ``refusal``: why this key is refused (revoked, expired, tenant disabled), else None;
    ``admin_id``: for the admin key, how admin events name it."""

    __slots__ = ("admin", "admin_id", "budget_scope", "expires_at", "key_id", "limit_scope",
                 "refusal", "tenant")

    def __init__(self, tenant: TenantConfig | None, admin: bool = False, *,
                 key_id: str = "", expires_at: float | None = None,
                 admin_id: str = "") -> None:
        self.tenant = tenant
        self.admin = admin
        self.key_id = key_id
        self.expires_at = expires_at
        self.refusal: TollwayError | None = None
        self.admin_id = admin_id
        self.limit_scope = ""  # a key with its own rate limits: "<tenant>/<key id>"
        self.budget_scope = ""  # a key with its own daily budget: "<tenant>/<key id>"

    @property
    def tenant_id(self) -> str:
        return self.tenant.id if self.tenant is not None else ""


class Directory(Protocol):
    """Run-time keys (``tollway.directory.Directory``)."""

    def resolve(self, digest: str) -> tuple[str, Principal] | None: ...


class KeyIndex:
    """Resolves a presented key to a Principal; built once per app. Config keys first, then
    the directory's (run-time keys, when the events layer runs)."""

    __slots__ = ("_admin", "_admin_hash", "_by_hash", "directory")

    def __init__(self, config: Config, env: Mapping[str, str]) -> None:
        self._by_hash: dict[str, tuple[str, Principal]] = {}
        for tenant in config.tenants:
            principal = Principal(tenant)
            for digest in tenant.key_sha256:
                self._by_hash[digest] = (digest, principal)
        admin_key = env.get(config.server.admin_key_env) if config.server.admin_key_env else None
        self._admin_hash = hash_key(admin_key) if admin_key else None
        # Events name the admin key that made a change by its hash's first 12 hex digits.
        self._admin = Principal(None, admin=True,
                                admin_id=f"sha256:{(self._admin_hash or '')[:12]}")
        self.directory: Directory | None = None

    @property
    def admin_enabled(self) -> bool:
        return self._admin_hash is not None

    def resolve(self, key: str) -> Principal | None:
        digest = hash_key(key)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return self._admin
        hit = self._by_hash.get(digest)
        if hit is None and self.directory is not None:
            hit = self.directory.resolve(digest)
        if hit is not None and hmac.compare_digest(hit[0], digest):
            return hit[1]
        return None
