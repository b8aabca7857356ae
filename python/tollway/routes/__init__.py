"""HTTP routes; each module exposes ``routes(gateway) -> list[Route]``."""
