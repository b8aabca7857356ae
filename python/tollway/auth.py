"""API keys: bearer key -> tenant by SHA-256, and the admin key.

Keys are stored only as SHA-256 hex digests. Looking the digest up in a dict
is safe against timing attacks because the digest of an unknown key says
nothing about any stored key; the final comparison is constant-time anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qsl

from tollway.config import Config, TenantConfig

# Paths anyone may call; everything else needs a key (deny by default).
# The OpenAPI document is public too: it says nothing the source does not, and clients and
# tools (SDK generators, fuzzers) load it before they hold a key.
PUBLIC_PATHS: Final = frozenset({"/api/ai/health", "/api/ai/ready", "/api/ai/metrics",
                                 "/api/ai/openapi.json"})
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


class Principal:
    """Who is calling: a tenant, or the operator holding the admin key."""

    __slots__ = ("admin", "tenant")

    def __init__(self, tenant: TenantConfig | None, admin: bool = False) -> None:
        self.tenant = tenant
        self.admin = admin

    @property
    def tenant_id(self) -> str:
        return self.tenant.id if self.tenant is not None else ""


class KeyIndex:
    """Resolves a presented key to a Principal; built once per app."""

    __slots__ = ("_admin", "_admin_hash", "_by_hash")

    def __init__(self, config: Config, env: Mapping[str, str]) -> None:
        self._by_hash: dict[str, tuple[str, Principal]] = {}
        for tenant in config.tenants:
            principal = Principal(tenant)
            for digest in tenant.key_sha256:
                self._by_hash[digest] = (digest, principal)
        admin_key = env.get(config.server.admin_key_env) if config.server.admin_key_env else None
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._admin = Principal(None, admin=True)

    @property
    def admin_enabled(self) -> bool:
        return self._admin_hash is not None

    def resolve(self, key: str) -> Principal | None:
        digest = hash_key(key)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return self._admin
        hit = self._by_hash.get(digest)
        if hit is not None and hmac.compare_digest(hit[0], digest):
            return hit[1]
        return None
