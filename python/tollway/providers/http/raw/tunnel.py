"""A CONNECT tunnel through an HTTP proxy, for https upstreams (RFC 9110 9.3.6)."""

from __future__ import annotations

import asyncio
import socket

from tollway.errors import UpstreamConnectFailed
from tollway.providers.http.proxy import Proxy

_MAX_HEAD = 16 * 1024


async def open_tunnel(loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int,
                      name: str) -> socket.socket:
    """A socket connected through ``proxy`` to ``host:port``, ready for TLS.

    The caller bounds the time. Errors name the provider and the proxy's status,
    never the proxy's credentials.
    """
    infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError("proxy address not found")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        authority = f"[{host}]" if ":" in host else host
        lines = [f"CONNECT {authority}:{port} HTTP/1.1\r\nHost: {authority}:{port}\r\n"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}\r\n")
        lines.append("\r\n")
        await loop.sock_sendall(sock, "".join(lines).encode("latin-1"))
        head = b""
        # Byte by byte past the blank line would be slow; the proxy sends nothing after
        # its reply until the TLS handshake starts, so whole reads cannot take TLS bytes.
        while b"\r\n\r\n" not in head:
            data = await loop.sock_recv(sock, 4096)
            if not data or len(head) > _MAX_HEAD:
                raise UpstreamConnectFailed(f"{name}: the proxy closed the tunnel")
            head += data
        status_line = head.split(b"\r\n", 1)[0].split()
        status = status_line[1] if len(status_line) > 1 else b"?"
        if not status.startswith(b"2"):
            raise UpstreamConnectFailed(
                f"{name}: the proxy refused the tunnel (HTTP {status.decode('latin-1')})")
        return sock
    except BaseException:
        sock.close()
        raise
