"""Whether the gateway traces, and how: ``[tracing]`` with the ``OTEL_*`` environment.

Read once, when the gateway is built: :func:`tracing_settings` gives the
tracer's :class:`TracingSettings`, or None (off). What the file sets wins;
what it leaves out comes from the environment variables OpenTelemetry's SDKs
read (see :class:`tollway.config.TracingConfig`); ``OTEL_SDK_DISABLED=true``
and ``OTEL_TRACES_EXPORTER=none`` turn tracing off whatever the file says.
Imports nothing of OpenTelemetry but to check, when tracing is on, that the
``tollway[otel]`` extra is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from tollway.config import ConfigError, TracingConfig

__all__ = ["TracingSettings", "tracing_settings"]

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
SOURCE = "<environment>"
_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio")


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """What the tracer is built from: ``[tracing]`` with the environment filled in."""

    endpoint: str = DEFAULT_ENDPOINT
    service_name: str = "tollway"
    sample_ratio: float = 1.0  # of the traces this gateway starts
    parent_based: bool = True  # a caller's sampled flag decides for its calls
    export_timeout_s: float = 10.0
    headers: dict[str, str] = field(default_factory=dict)  # to the collector (secrets: env)
    resource: dict[str, str] = field(default_factory=dict)  # OTEL_RESOURCE_ATTRIBUTES
    # The batch processor (OTEL_BSP_*); None: the SDK's defaults.
    schedule_delay_ms: float | None = None
    max_queue_size: int | None = None
    max_export_batch_size: int | None = None


def tracing_settings(cfg: TracingConfig, env: Mapping[str, str]) -> TracingSettings | None:
    """The tracer's settings, or None when tracing is off. Raises ConfigError for a bad
    value, or when tracing is on and the ``tollway[otel]`` extra is not installed."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter == "none":
        return None
    enabled = cfg.enabled if cfg.enabled is not None else "otlp" in exporter.split(",")
    if not enabled:
        return None
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(var, "").strip()
        if protocol and protocol != "http/protobuf":
            raise ConfigError(f"{var}={protocol!r}: tollway exports OTLP over HTTP with "
                              "protobuf only (http/protobuf)", source=SOURCE)
        if protocol:
            break
    endpoint = cfg.endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        endpoint = base.rstrip("/") + "/v1/traces" if base else DEFAULT_ENDPOINT
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"the OTLP endpoint {endpoint!r} is not an http:// or https:// URL",
                          source=SOURCE)
    ratio, parent_based = _sampler(cfg, env)
    settings = TracingSettings(
        endpoint=endpoint,
        service_name=cfg.service_name or env.get("OTEL_SERVICE_NAME", "").strip() or "tollway",
        sample_ratio=ratio,
        parent_based=parent_based,
        export_timeout_s=cfg.export_timeout_s,
        headers=_pairs(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
                       or env.get("OTEL_EXPORTER_OTLP_HEADERS", ""), "OTEL_EXPORTER_OTLP_HEADERS"),
        resource=_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES"),
        schedule_delay_ms=_number(env, "OTEL_BSP_SCHEDULE_DELAY"),
        max_queue_size=_whole(env, "OTEL_BSP_MAX_QUEUE_SIZE"),
        max_export_batch_size=_whole(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
    )
    try:  # the extra, checked now: the gateway never starts half-configured
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"tracing is on but OpenTelemetry is not installed ({exc.name}): "
                          "pip install 'tollway[otel]'", source="[tracing]") from None
    return settings


def _sampler(cfg: TracingConfig, env: Mapping[str, str]) -> tuple[float, bool]:
    if cfg.sample_ratio is not None:
        return cfg.sample_ratio, True
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={name!r}: tollway knows "
                          f"{', '.join(_SAMPLERS)}", source=SOURCE)
    parent_based = name.startswith("parentbased_")
    if name.endswith("always_on"):
        return 1.0, parent_based
    if name.endswith("always_off"):
        return 0.0, parent_based
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: a ratio from 0 to 1",
                          source=SOURCE)
    return ratio, parent_based


def _pairs(text: str, var: str) -> dict[str, str]:
    """``key=value,key2=value2`` (values percent-encoded), as OTEL_* lists are written."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # The value may be a secret (a collector's token): the message does not show it.
            raise ConfigError(f"{var}: each entry must be key=value", source=SOURCE)
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def _number(env: Mapping[str, str], var: str) -> float | None:
    text = env.get(var, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{var}={text!r}: a number of milliseconds", source=SOURCE)
    return value


def _whole(env: Mapping[str, str], var: str) -> int | None:
    text = env.get(var, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{var}={text!r}: a whole number of spans, 1 or more",
                          source=SOURCE)
    return int(text)
