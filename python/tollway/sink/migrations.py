"""The ledger's schema: versioned SQL files shipped in the package, applied forward only.

``migrations/NNNN_name.sql`` is version NNNN. ``schema_version`` holds one row per applied
version with the file's SHA-256: a shipped file never changes (one that did is refused), a
change to the schema is a new file. Each file runs in its own transaction with its row, under
an advisory lock, so two sinks started with ``--migrate`` at once apply each version once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

LOCK_KEY = 0x746F6C6C77617931  # "tollway1": pg_advisory_xact_lock's key for migrations
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


class SchemaError(RuntimeError):
    """The database's schema is not what this sink writes (behind, or changed files)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def shipped(directory: Traversable | Path | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default: the package's), by version."""
    root = directory if directory is not None else resources.files("tollway.sink") / "migrations"
    out = []
    for entry in root.iterdir():
        m = _NAME.fullmatch(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    if [m.version for m in out] != list(range(1, len(out) + 1)):
        raise SchemaError(f"migrations must be numbered 1..n without gaps: "
                          f"{[m.version for m in out]}")
    return out


def applied(conn: Any) -> dict[int, str]:
    """Version -> sha256 of what the database has applied ({} for an empty database)."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return {}
    return {int(v): str(h) for v, h in
            conn.execute("SELECT version, sha256 FROM schema_version").fetchall()}


def current_version(conn: Any) -> int:
    return max(applied(conn), default=0)


def _check_unchanged(done: dict[int, str], migrations: list[Migration]) -> None:
    for m in migrations:
        if m.version in done and done[m.version] != m.sha256:
            raise SchemaError(f"migration {m.version:04d}_{m.name} differs from the one this "
                              "database applied: shipped migrations never change")


def migrate(conn: Any, migrations: list[Migration] | None = None,
            target: int | None = None) -> list[int]:
    """Apply the migrations the database lacks, up to ``target`` (default: all); returns the
    versions applied. ``conn`` is a psycopg connection, not in a transaction."""
    migrations = shipped() if migrations is None else migrations
    want = [m for m in migrations if target is None or m.version <= target]
    done_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_version (
            version integer PRIMARY KEY, name text NOT NULL, sha256 text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
    for m in want:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            done = applied(conn)
            _check_unchanged(done, migrations)
            if m.version in done:
                continue
            if m.version != max(done, default=0) + 1:
                raise SchemaError(f"database at version {max(done, default=0)}, cannot apply "
                                  f"{m.version}")
            conn.execute(m.sql)
            conn.execute("INSERT INTO schema_version (version, name, sha256) VALUES "
                         "(%s, %s, %s)", (m.version, m.name, m.sha256))
            done_now.append(m.version)
    return done_now


def check(conn: Any, migrations: list[Migration] | None = None) -> int:
    """The database's version, if this sink can write to it; else :class:`SchemaError`.

    A database ahead of the shipped migrations is fine (a newer sink migrated it: columns
    are only ever added, with defaults); one behind needs ``--migrate``.
    """
    migrations = shipped() if migrations is None else migrations
    done = applied(conn)
    _check_unchanged(done, migrations)
    have, need = max(done, default=0), migrations[-1].version
    if have < need:
        raise SchemaError(f"the database's ledger schema is at version {have}, this sink "
                          f"needs {need}: run `tollway sink postgres --migrate`")
    return have
