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

from tollway.config import Config, TenantConfig

# Paths anyone may call; everything else needs a key (deny by default).
PUBLIC_PATHS: Final = frozenset({"/api/ai/health", "/api/ai/ready", "/api/ai/metrics"})
# Paths that need the admin key.
ADMIN_PREFIXES: Final = ("/api/ai/providers", "/api/ai/shadow")

KEY_PREFIX: Final = "tw-"


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
