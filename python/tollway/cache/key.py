"""Whether a call may use the response cache, and its key.

A call reads the cache when all hold (else it bypasses it, and says why):

- it is a chat completion, of a tenant or route that opted in (``[cache] tenants``,
  ``[cache] routes``, or the tenant's own ``cache = true``);
- its ``temperature`` is at most ``[cache] max_temperature`` (default 0). A request
  that sets none samples at the provider's default, OpenAI's 1.0, and is judged so;
- the caller did not send ``Cache-Control: no-cache`` (read past the cache; the fresh
  answer is still stored) or ``no-store`` (neither read nor stored).

The key is a BLAKE2b digest of the tenant, the model the plan resolved (its first
candidate: an alias never shares entries with another alias's models, and a route that
learning moved to another model reads that model's entries) and the canonical request:
every field of the body but ``model``, ``stream``, ``stream_options`` and ``user``, keys
sorted, as compact JSON. A streamed and a plain call of one request share their entry.
The tenant is inside the digest, and the entry names its tenant too, checked on read.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

__all__ = ["IGNORED_FIELDS", "cache_control", "cache_key", "canonical"]

# Fields that do not change the answer (how it is delivered, who asked).
IGNORED_FIELDS = frozenset({"model", "stream", "stream_options", "user"})

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder(order="sorted").encode


def canonical(body: bytes) -> bytes:
    """The request's fields that shape the answer, as sorted compact JSON."""
    fields = _decode(body)
    for name in IGNORED_FIELDS & fields.keys():
        del fields[name]
    return _encode(fields)


def cache_key(tenant: str, model: str, body: bytes) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(tenant.encode())
    h.update(b"\0")
    h.update(model.encode())
    h.update(b"\0")
    h.update(canonical(body))
    return h.hexdigest()


def cache_control(value: str) -> tuple[bool, bool]:
    """(no_cache, no_store) of a ``Cache-Control`` request header."""
    directives = {d.split("=", 1)[0].strip().lower() for d in value.split(",")}
    no_store = "no-store" in directives
    return no_store or "no-cache" in directives, no_store
