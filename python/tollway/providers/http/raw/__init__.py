"""tollway's own HTTP/1.1 client (the default ``http_client``); see README.md here."""

from tollway.providers.http.raw.client import RawHttpClient, RawStream

__all__ = ["RawHttpClient", "RawStream"]
