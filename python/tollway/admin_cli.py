"""``tollway tenants ...`` and ``tollway keys ...``: the admin API from a shell.

Each command is one request to a running gateway (``--url``, default
``$TOLLWAY_URL``, e.g. ``http://127.0.0.1:8080``) with the admin key read from an
environment variable (``--admin-key-env``, default ``TOLLWAY_ADMIN_KEY``), never
from the command line, where it would land in the shell's history. The answer is
printed as JSON; an error prints the gateway's message and exits 1.

``tollway keys create --tenant ID`` without a URL keeps its first meaning: a key
and the hash to put in the config file, made offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ADMIN = "/api/ai/admin"
TIMEOUT_S = 30.0


class AdminError(Exception):
    pass


def request(args: argparse.Namespace, method: str, path: str,
            body: dict[str, Any] | None = None) -> Any:
    base = (args.url or os.environ.get("TOLLWAY_URL") or "").rstrip("/")
    if not base:
        raise AdminError("no gateway URL: pass --url or set TOLLWAY_URL")
    key = os.environ.get(args.admin_key_env)
    if not key:
        raise AdminError(f"environment variable {args.admin_key_env} (the admin key) is not set")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            text = f"{exc.code} {error.get('code') or error.get('type')}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            text = f"{exc.code} {exc.reason}"
        raise AdminError(text) from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from None


def _limits(args: argparse.Namespace) -> dict[str, int]:
    return {name: getattr(args, name) for name in
            ("per_minute", "per_hour", "per_day", "expensive_per_hour", "tokens_per_minute")
            if getattr(args, name, None) is not None}


def _tenant_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.tier is not None:
        body["tier"] = args.tier
    if args.daily_usd is not None:
        body["daily_usd"] = args.daily_usd
    if args.models is not None:
        body["models"] = [m for m in args.models.split(",") if m] or None
    if args.max_sensitivity is not None:
        body["max_sensitivity"] = args.max_sensitivity
    limits = _limits(args)
    if limits:
        body["limits"] = limits
    return body


def cmd_tenants(args: argparse.Namespace) -> Any:
    what = args.tenants_command
    if what == "list":
        return request(args, "GET", f"{ADMIN}/tenants")
    if what == "show":
        return request(args, "GET", f"{ADMIN}/tenants/{args.id}")
    if what == "create":
        return request(args, "POST", f"{ADMIN}/tenants", {"id": args.id, **_tenant_body(args)})
    if what == "update":
        body = _tenant_body(args)
        if args.disable or args.enable:
            body["disabled"] = bool(args.disable)
        return request(args, "PATCH", f"{ADMIN}/tenants/{args.id}", body)
    return request(args, "DELETE", f"{ADMIN}/tenants/{args.id}")  # disable


def cmd_keys(args: argparse.Namespace) -> Any:
    what = args.keys_command
    if what == "list":
        suffix = f"?tenant={args.tenant}" if args.tenant else ""
        return request(args, "GET", f"{ADMIN}/keys{suffix}")
    if what == "create":
        body: dict[str, Any] = {"tenant": args.tenant}
        if args.name:
            body["name"] = args.name
        if args.expires_in is not None:
            body["expires_at"] = time.time() + args.expires_in
        if args.models is not None:
            body["models"] = [m for m in args.models.split(",") if m]
        return request(args, "POST", f"{ADMIN}/keys", body)
    if what == "revoke":
        return request(args, "DELETE", f"{ADMIN}/keys/{args.id}")
    return request(args, "POST", f"{ADMIN}/keys/{args.id}/rotate",
                   {"overlap_s": args.overlap_s})


def run(args: argparse.Namespace) -> int:
    try:
        answer = cmd_tenants(args) if args.command == "tenants" else cmd_keys(args)
    except AdminError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    if isinstance(answer, dict) and "key" in answer:
        print("(the key is shown once: store it now; tollway keeps only its SHA-256)",
              file=sys.stderr)
    return 0


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the gateway (default: $TOLLWAY_URL)")
    p.add_argument("--admin-key-env", default="TOLLWAY_ADMIN_KEY",
                   help="environment variable holding the admin key")
    p.set_defaults(func=run)


def _settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tier")
    p.add_argument("--daily-usd", type=float)
    p.add_argument("--models", help="comma-separated model ids and aliases ('' for all)")
    p.add_argument("--max-sensitivity",
                   choices=("public", "internal", "confidential", "restricted"))
    for name in ("per-minute", "per-hour", "per-day", "expensive-per-hour",
                 "tokens-per-minute"):
        p.add_argument(f"--{name}", type=int, metavar="N")


def add_tenant_commands(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="tenants at run time (admin API)")
    cmds = tenants.add_subparsers(dest="tenants_command", required=True)
    _connection(cmds.add_parser("list", help="every tenant, config and directory"))
    p = cmds.add_parser("show", help="one tenant")
    p.add_argument("id")
    _connection(p)
    p = cmds.add_parser("create", help="a run-time tenant")
    p.add_argument("id")
    _settings(p)
    _connection(p)
    p = cmds.add_parser("update", help="change a run-time tenant")
    p.add_argument("id")
    _settings(p)
    state = p.add_mutually_exclusive_group()
    state.add_argument("--disable", action="store_true")
    state.add_argument("--enable", action="store_true")
    _connection(p)
    p = cmds.add_parser("disable", help="refuse every key of a run-time tenant")
    p.add_argument("id")
    _connection(p)


def add_key_commands(keys: Any, offline_create: Any) -> None:
    """``keys list|revoke|rotate`` and the API form of ``keys create``."""
    p = keys.add_parser("create", help="a new key: through the admin API with --url or "
                        "$TOLLWAY_URL, else offline, with its hash for the config file")
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--expires-in", type=float, metavar="SECONDS")
    p.add_argument("--models", help="comma-separated: fewer than the tenant's")
    _connection(p)
    p.set_defaults(func=lambda a: run(a) if (a.url or os.environ.get("TOLLWAY_URL"))
                   else offline_create(a))
    p = keys.add_parser("list", help="the directory's keys (never the keys themselves)")
    p.add_argument("--tenant")
    _connection(p)
    p = keys.add_parser("revoke", help="refuse a key on every gateway")
    p.add_argument("id")
    _connection(p)
    p = keys.add_parser("rotate", help="a new key in place of one; the old works for the overlap")
    p.add_argument("id")
    p.add_argument("--overlap-s", type=float, default=3600.0)
    _connection(p)
