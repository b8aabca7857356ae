"""The admin API for tenants and keys (admin key only; DESIGN.md, round 2).

Bodies are decoded into the structs below, which say what each field may hold: a
field that does not fit is a 400 in the OpenAI envelope naming it. Changes go through
:class:`tollway.directory.Directory` (an admin event on the stream, folded by every
gateway); the answers are the structs at the bottom, which the OpenAPI document
publishes and the fuzzing test holds the handlers to.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, cast

import msgspec
from msgspec import UNSET, Meta, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway.config import Name, TenantId
from tollway.context import info_of
from tollway.errors import InvalidRequest, error_body
from tollway.events.schema import FlagSettings, TenantLimitSettings, TenantSettings
from tollway.gateway import Gateway
from tollway.pipeline.decode import invalid_request

Sensitivity = Literal["public", "internal", "confidential", "restricted"]
Count = Annotated[int, Meta(ge=0, le=10**12)]
Usd = Annotated[float, Meta(ge=0, le=10**9)]
KeyName = Annotated[str, Meta(max_length=128)]
MAX_OVERLAP_S = 30 * 86400.0


class LimitsBody(msgspec.Struct, forbid_unknown_fields=True):
    """Rate limits; a tier left out keeps the config's default ([guards] default_limits)
    on create, its current value on change. 0 turns a tier off."""

    per_minute: Count | UnsetType = UNSET
    per_hour: Count | UnsetType = UNSET
    per_day: Count | UnsetType = UNSET
    expensive_per_hour: Count | UnsetType = UNSET
    tokens_per_minute: Count | UnsetType | None = UNSET


class TenantCreate(msgspec.Struct, forbid_unknown_fields=True):
    id: TenantId
    tier: Name = "standard"
    limits: LimitsBody | None = None
    daily_usd: Usd | None = None  # None: the tier's
    models: list[Name] | None = None  # model ids and route aliases allowed; None: all
    max_sensitivity: Sensitivity | None = None  # the highest X-Tollway-Sensitivity; None: any


class TenantPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields given change; ``null`` resets ``daily_usd`` (to the tier's),
    ``models`` (to all) and ``max_sensitivity`` (to any)."""

    tier: Name | UnsetType = UNSET
    limits: LimitsBody | UnsetType = UNSET
    daily_usd: Usd | UnsetType | None = UNSET
    models: list[Name] | UnsetType | None = UNSET
    max_sensitivity: Sensitivity | UnsetType | None = UNSET
    disabled: bool | UnsetType = UNSET


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    tenant: TenantId
    name: KeyName = ""
    expires_at: Annotated[float, Meta(gt=0)] | None = None  # unix seconds; None: never
    models: list[Name] | None = None  # within the tenant's; None: the tenant's
    # The key's own rate limits, on top of the tenant's; a tier left out is not limited
    # for the key.
    limits: LimitsBody | None = None
    # The key's own daily budget, held beside the tenant's (which still holds); None: only
    # the tenant's.
    daily_usd: Usd | None = None


class KeyRotate(msgspec.Struct, forbid_unknown_fields=True):
    # How long the old key keeps working beside the new one.
    overlap_s: Annotated[float, Meta(ge=0, le=MAX_OVERLAP_S)] = 3600.0


class FlagPut(msgspec.Struct, forbid_unknown_fields=True):
    """A gradual rollout: calls to ``route`` of the tenants in it go to ``candidates``."""

    route: Name  # a route alias or model id the callers ask for ([[shadow]] route: shadow)
    # model ids (kind route: at least one; kind shadow: none)
    candidates: Annotated[list[Name], Meta(max_length=32)] = []
    percent: Annotated[float, Meta(ge=0, le=100)] = 0.0  # of tenants, sticky by a hash
    tenants: Annotated[list[TenantId], Meta(max_length=10_000)] = []  # in, whatever percent
    enabled: bool = True
    # route: the tenants' calls go to `candidates`; shadow: the [[shadow]] route samples
    # the tenants' calls only; guard: their calls to `route` ("*": any) have
    # `max_call_usd` as the per-call cost cap
    kind: Literal["route", "shadow", "guard"] = "route"
    max_call_usd: Usd | None = None


FLAG_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


# ---- answers (the OpenAPI document's schemas) ----------------------------------------------
class TenantLimitsView(msgspec.Struct):
    per_minute: int
    per_hour: int
    per_day: int
    expensive_per_hour: int
    tokens_per_minute: int | None


class TenantView(msgspec.Struct):
    """A tenant: of the config file (``source: config``, read only here) or made through
    this API (``source: admin``)."""

    id: str
    source: Literal["config", "admin"]
    tier: str
    limits: TenantLimitsView
    daily_usd: float | None
    models: list[str] | None
    max_sensitivity: str | None
    disabled: bool
    created_at: float | None = None
    changed_at: float | None = None
    created_by: str | None = None


class TenantList(msgspec.Struct):
    object: Literal["list"]
    data: list[TenantView]


class KeyView(msgspec.Struct):
    """A key as listed: never the key itself, nor its hash."""

    id: str
    object: Literal["key"]
    tenant: str
    prefix: str
    name: str
    created_at: float
    created_by: str
    expires_at: float | None
    models: list[str] | None
    revoked_at: float | None
    rotated_to: str | None
    rotated_from: str | None
    limits: TenantLimitsView | None  # the key's own, on top of the tenant's
    daily_usd: float | None  # the key's own daily budget, beside the tenant's
    last_used_at: float | None  # the latest call with it, on any gateway of the stream
    state: Literal["active", "expired", "revoked"]


class NewKey(KeyView):
    """A key just made: ``key`` is shown here only, once."""

    key: str
    previous: KeyView | None = None  # rotate: the old key, working until its expires_at


class FlagView(msgspec.Struct):
    name: str
    object: Literal["flag"]
    kind: Literal["route", "shadow", "guard"]
    route: str
    candidates: list[str]
    percent: float
    tenants: list[str]
    enabled: bool
    max_call_usd: float | None
    changed_at: float
    changed_by: str


class FlagList(msgspec.Struct):
    object: Literal["list"]
    data: list[FlagView]


class KeyList(msgspec.Struct):
    object: Literal["list"]
    data: list[KeyView]


_json = msgspec.json.Encoder()


def _answer(body: Any, status: int = 200) -> Response:
    return Response(_json.encode(body), status, media_type="application/json")


def _error(exc: Exception) -> Response:
    status, body = error_body(exc)
    return Response(body, status, media_type="application/json")


def _settings_limits(body: LimitsBody | None, base: TenantLimitSettings) -> TenantLimitSettings:
    if body is None:
        return base
    fields = {f: getattr(body, f) for f in body.__struct_fields__}
    given = {k: v for k, v in fields.items() if v is not UNSET}
    return msgspec.structs.replace(base, **given)


def routes(gateway: Gateway) -> list[Route]:
    directory = gateway.directory
    config = gateway.config
    d = config.guards.default_limits
    defaults = TenantLimitSettings(per_minute=d.per_minute, per_hour=d.per_hour,
                                   per_day=d.per_day, expensive_per_hour=d.expensive_per_hour,
                                   tokens_per_minute=d.tokens_per_minute)

    def check_tier(tier: str) -> None:
        if tier not in config.tiers:
            raise InvalidRequest(f"unknown tier {tier!r}: one of {', '.join(sorted(config.tiers))}",
                                 param="tier")

    def check_models(models: list[str] | None, param: str = "models") -> None:
        for name in models or ():
            if name not in gateway.catalog.models and name not in gateway.catalog.routes:
                raise InvalidRequest(f"no model or route alias {name!r}", param=param)

    async def body_of(request: Request, struct: type[Any]) -> Any:
        raw = await request.body()
        try:
            return msgspec.json.decode(raw or b"{}", type=struct)
        except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
            raise invalid_request(exc) from None

    def admin_of(request: Request) -> str:
        principal = info_of(cast(dict[str, Any], request.scope)).principal
        return principal.admin_id if principal is not None else ""

    async def list_tenants(request: Request) -> Response:
        return _answer({"object": "list", "data": directory.list_tenants()})

    async def create_tenant(request: Request) -> Response:
        try:
            body: TenantCreate = await body_of(request, TenantCreate)
            check_tier(body.tier)
            check_models(body.models)
            settings = TenantSettings(
                tier=body.tier, limits=_settings_limits(body.limits, defaults),
                daily_usd=body.daily_usd,
                models=tuple(body.models) if body.models is not None else None,
                max_sensitivity=body.max_sensitivity)
            return _answer(await directory.create_tenant(body.id, settings, admin_of(request)),
                           201)
        except Exception as exc:
            return _error(exc)

    async def get_tenant(request: Request) -> Response:
        try:
            return _answer(directory.get_tenant(request.path_params["id"]))
        except Exception as exc:
            return _error(exc)

    async def patch_tenant(request: Request) -> Response:
        try:
            body: TenantPatch = await body_of(request, TenantPatch)
            if body.tier is not UNSET:
                check_tier(body.tier)
            if body.models is not UNSET:
                check_models(body.models)

            def change(s: TenantSettings) -> TenantSettings:
                given: dict[str, Any] = {}
                for f in ("tier", "daily_usd", "max_sensitivity", "disabled"):
                    value = getattr(body, f)
                    if value is not UNSET:
                        given[f] = value
                if body.models is not UNSET:
                    given["models"] = tuple(body.models) if body.models is not None else None
                if body.limits is not UNSET:
                    given["limits"] = _settings_limits(body.limits, s.limits)
                return msgspec.structs.replace(s, **given)

            return _answer(await directory.change_tenant(request.path_params["id"], change,
                                                         admin_of(request)))
        except Exception as exc:
            return _error(exc)

    async def disable_tenant(request: Request) -> Response:
        try:
            return _answer(await directory.change_tenant(
                request.path_params["id"],
                lambda s: msgspec.structs.replace(s, disabled=True), admin_of(request)))
        except Exception as exc:
            return _error(exc)

    async def list_keys(request: Request) -> Response:
        tenant = request.query_params.get("tenant") or None
        return _answer({"object": "list", "data": directory.list_keys(tenant)})

    async def create_key(request: Request) -> Response:
        try:
            body: KeyCreate = await body_of(request, KeyCreate)
            check_models(body.models)
            if body.expires_at is not None and body.expires_at <= time.time():
                raise InvalidRequest("expires_at is in the past", param="expires_at")
            limits = None if body.limits is None else _settings_limits(
                body.limits, TenantLimitSettings(per_minute=0, per_hour=0, per_day=0,
                                                 expensive_per_hour=0))
            return _answer(await directory.create_key(
                body.tenant, admin_of(request), name=body.name, expires_at=body.expires_at,
                models=tuple(body.models) if body.models is not None else None,
                limits=limits, daily_usd=body.daily_usd), 201)
        except Exception as exc:
            return _error(exc)

    async def revoke_key(request: Request) -> Response:
        try:
            return _answer(await directory.revoke_key(request.path_params["id"],
                                                      admin_of(request)))
        except Exception as exc:
            return _error(exc)

    async def rotate_key(request: Request) -> Response:
        try:
            body: KeyRotate = await body_of(request, KeyRotate)
            return _answer(await directory.rotate_key(request.path_params["id"],
                                                      body.overlap_s, admin_of(request)), 201)
        except Exception as exc:
            return _error(exc)

    async def list_flags(request: Request) -> Response:
        return _answer({"object": "list", "data": directory.list_flags()})

    def flag_name(request: Request) -> str:
        name: str = request.path_params["name"]
        if not FLAG_NAME.fullmatch(name):
            raise InvalidRequest("a flag name is 1-64 letters, digits, '_' or '-'",
                                 param="name")
        return name

    async def get_flag(request: Request) -> Response:
        try:
            return _answer(directory.get_flag(flag_name(request)))
        except Exception as exc:
            return _error(exc)

    async def put_flag(request: Request) -> Response:
        try:
            name = flag_name(request)
            body: FlagPut = await body_of(request, FlagPut)
            catalog = gateway.catalog
            if body.kind != "guard" and body.max_call_usd is not None:
                raise InvalidRequest("max_call_usd is a guard flag's setting",
                                     param="max_call_usd")
            if body.kind == "guard":
                if body.max_call_usd is None:
                    raise InvalidRequest("a guard flag sets max_call_usd", param="max_call_usd")
                if body.candidates:
                    raise InvalidRequest("a guard flag takes no candidates", param="candidates")
                if (body.route != "*" and body.route not in catalog.models
                        and body.route not in catalog.routes):
                    raise InvalidRequest(f"no model or route alias {body.route!r} (or '*')",
                                         param="route")
            elif body.kind == "shadow":
                if all(e.route != body.route or e.mode != "shadow" for e in config.shadow):
                    raise InvalidRequest(f"no [[shadow]] route {body.route!r} in the config",
                                         param="route")
                if body.candidates:
                    raise InvalidRequest("a shadow flag takes no candidates (the [[shadow]] "
                                         "route's are compared)", param="candidates")
            elif not body.candidates:
                raise InvalidRequest("a route flag needs at least one candidate",
                                     param="candidates")
            elif body.route not in catalog.models and body.route not in catalog.routes:
                raise InvalidRequest(f"no model or route alias {body.route!r}", param="route")
            for m in body.candidates:
                if m not in gateway.catalog.models:
                    raise InvalidRequest(f"no model {m!r} (candidates are model ids)",
                                         param="candidates")
            settings = FlagSettings(kind=body.kind, route=body.route,
                                    candidates=tuple(body.candidates), percent=body.percent,
                                    tenants=tuple(body.tenants), enabled=body.enabled,
                                    max_call_usd=body.max_call_usd)
            return _answer(await directory.put_flag(name, settings, admin_of(request)))
        except Exception as exc:
            return _error(exc)

    base = "/api/ai/admin"
    return [
        Route(f"{base}/flags", list_flags, methods=["GET"]),
        Route(f"{base}/flags/{{name}}", get_flag, methods=["GET"]),
        Route(f"{base}/flags/{{name}}", put_flag, methods=["PUT"]),
        Route(f"{base}/tenants", list_tenants, methods=["GET"]),
        Route(f"{base}/tenants", create_tenant, methods=["POST"]),
        Route(f"{base}/tenants/{{id}}", get_tenant, methods=["GET"]),
        Route(f"{base}/tenants/{{id}}", patch_tenant, methods=["PATCH"]),
        Route(f"{base}/tenants/{{id}}", disable_tenant, methods=["DELETE"]),
        Route(f"{base}/keys", list_keys, methods=["GET"]),
        Route(f"{base}/keys", create_key, methods=["POST"]),
        Route(f"{base}/keys/{{id}}", revoke_key, methods=["DELETE"]),
        Route(f"{base}/keys/{{id}}/rotate", rotate_key, methods=["POST"]),
    ]
