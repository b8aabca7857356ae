"""The TLS context of a provider's connections: the system's trust store, or a CA bundle."""

from __future__ import annotations

import ssl


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Certificate and host name checks always on; ``ca_file`` replaces the system's CAs.

    A private CA (a company proxy that re-signs, a self-hosted vLLM behind its own
    certificate) is trusted this way, per provider, instead of switching checks off.
    """
    if ca_file is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=ca_file)
