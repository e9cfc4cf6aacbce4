"""The gateway's configuration file (YAML), its defaults, and the embedded default.

Shape (AISIX's, extended)::

    server:
      proxy: {listen: "127.0.0.1:3000", client_write_timeout_ms: 30000}
      admin: {listen: "127.0.0.1:3001"}
      shutdown_grace_ms: 30000
    deployment:
      admin: {admin_key: [{key: "..."}]}
      config_provider: file            # file (default) | etcd
      file: {path: "./aisix-data/resources.json"}
      etcd: {host: ["127.0.0.1:2379"], prefix: "/aisix", timeout: 5}
      rate_limit_store: {kind: local}  # local (default) | redis: shared by every worker and node
    observability:
      service_name: aisix
      metrics: {otlp_endpoint: "http://127.0.0.1:9090/api/v1/otlp/v1/metrics", export_interval_ms: 5000,
                prometheus: {listen: "127.0.0.1:9464"}}   # the scrape endpoint: off by default
      traces: {otlp_endpoint: "http://127.0.0.1:4317"}
      access_log: {path: "-"}          # off by default; "-" = stdout, else a file
    models:  [...]     # upserted by name at start-up
    apikeys: [...]     # upserted by key at start-up (stored as its SHA-256)

The standard OpenTelemetry variables override the file: ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_SDK_DISABLED``,
``OTEL_TRACES_SAMPLER`` (``always_on``/``always_off``/``traceidratio``, ``parentbased_*`` alike)
with ``OTEL_TRACES_SAMPLER_ARG``
(https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/).
"""
from __future__ import annotations

import json
import os
import re
import secrets
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aisix.config.resources import MAX_INT, ApiKeyWrite, Model, fallback_problems, new_client_key, validation_problems


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, the field and the fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port`` too) → ``(host, port)``. Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"`{value}` is not host:port")
    return host.strip("[]"), int(port)


class Listen(_Strict):
    listen: str

    @field_validator("listen")
    @classmethod
    def _check(cls, v: str) -> str:
        parse_listen(v)
        return v


class CorsConfig(_Strict):
    """CORS for browser clients on the proxy listener (https://fetch.spec.whatwg.org/#http-cors-protocol)."""

    allow_origins: list[str] = Field(..., min_length=1, description='origins allowed, e.g. "https://app.example.com", '
                                     'or "*" for any')
    allow_headers: list[str] = Field(["*"], description="request headers a browser may send (preflight)")
    expose_headers: list[str] = Field(["*"], description="response headers a browser script may read")
    allow_credentials: bool = Field(False, description="let browsers send cookies/HTTP auth (never with `*`)")
    max_age_s: int = Field(600, ge=0, le=MAX_INT, description="how long a browser may cache a preflight answer, s")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for o in v:
            if o != "*" and not re.fullmatch(r"https?://[^/\s?#]+", o):
                raise ValueError(f'`{o}` is not an origin (scheme://host[:port], no path) or "*"')
        return v

    @model_validator(mode="after")
    def _no_credentials_for_any(self) -> "CorsConfig":
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError('allow_credentials needs explicit origins, not "*" (the Fetch standard forbids it)')
        return self


class ProxyListen(Listen):
    """The proxy listener. ``client_write_timeout_ms``: a client that takes no bytes for this long
    while the gateway has output waiting for it is disconnected (measured 499)."""

    cors: CorsConfig | None = Field(None, description="off unless set")
    client_write_timeout_ms: int = Field(30_000, ge=1, le=MAX_INT, description=(
        "a client that reads nothing of a response for this long is disconnected, ms (499)"))


class ServerConfig(_Strict):
    proxy: ProxyListen = ProxyListen(listen="127.0.0.1:3000")
    admin: Listen = Listen(listen="127.0.0.1:3001")
    shutdown_grace_ms: int = Field(30_000, ge=0, le=MAX_INT, description="in-flight requests get this long after SIGTERM, ms")


class AdminKey(_Strict):
    key: str = Field(..., min_length=8)


class AdminConfig(_Strict):
    admin_key: list[AdminKey] = []


class FileProviderConfig(_Strict):
    path: str = "./aisix-data/resources.json"


class EtcdConfig(_Strict):
    host: list[str] = ["127.0.0.1:2379"]
    prefix: str = "/aisix"
    timeout: float = Field(5.0, gt=0, description="seconds per etcd call")

    @field_validator("host", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class RateLimitStoreConfig(_Strict):
    """Where rate-limit counts live: ``local`` (each process counts alone) or ``redis`` (one count
    for every worker and node; see :mod:`aisix.hooks.ratelimit_redis` and the README's "Several nodes")."""

    kind: Literal["local", "redis"] = "local"
    url: str = Field("redis://127.0.0.1:6379/0", description=(
        "redis://[[user]:password@]host:port/db, rediss:// (TLS) or unix:///path?db=0"))
    key_prefix: str = Field("aisix:", description="prepended to every Redis key the limiter writes")
    on_store_error: Literal["allow", "deny"] = Field("allow", description=(
        "Redis unreachable: allow = count on local counters until it answers again; deny = 429"))
    lease_ttl_ms: int = Field(10_000, ge=100, description=(
        "a concurrency slot's lease, renewed every third of it while its request runs; a node that "
        "dies without giving its slots back has them freed this long after its last renewal, ms"))
    timeout_ms: int = Field(500, ge=1, description="longest wait for Redis per call (connect or reply), ms")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        """A URL redis-py's ``parse_url`` reads (as the limiter's connection will), with a database
        number when it names one, and a CA file that exists when it names one."""
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        from redis.connection import parse_url
        try:
            parsed = parse_url(v)
        except ValueError as e:
            raise ValueError(f"not a Redis URL redis-py can read: {e}") from None
        path = urlsplit(v).path.strip("/")
        if not v.startswith("unix://") and path and not path.isdigit():
            raise ValueError(f"the database must be a number (redis://host:port/0), not {path!r}")
        ca = parsed.get("ssl_ca_certs")
        if ca is not None and not os.path.isfile(ca):
            raise ValueError(f"ssl_ca_certs: no such file: {ca}")
        return v


class DeploymentConfig(_Strict):
    admin: AdminConfig = AdminConfig()
    config_provider: Literal["file", "etcd"] = "file"
    file: FileProviderConfig = FileProviderConfig()
    etcd: EtcdConfig = EtcdConfig()
    rate_limit_store: RateLimitStoreConfig = RateLimitStoreConfig()


class MetricsConfig(_Strict):
    otlp_endpoint: str | None = Field("http://127.0.0.1:9090/api/v1/otlp/v1/metrics", min_length=1, description=(
        "OTLP/HTTP metrics push; null: no push (e.g. only the scrape endpoint; env OTEL_METRICS_EXPORTER=none)"))
    export_interval_ms: int = Field(5000, ge=100, le=MAX_INT)
    export_timeout_ms: int = Field(2000, ge=100, le=MAX_INT)
    exemplars: bool = Field(True, description="latency histograms carry the trace and span id of sampled "
                            "requests as exemplars (OTLP push; Prometheus stores them with exemplar-storage on)")
    prometheus: Listen | None = Field(None, description="serve GET /metrics for a scraping Prometheus on this "
                                      "host:port (worker i of --workers: port + i); off when absent")


class TracesConfig(_Strict):
    otlp_endpoint: str | None = Field("http://127.0.0.1:4317", min_length=1, description=(
        "OTLP/gRPC trace export; null: no spans are made or sent (trace context is still passed "
        "upstream; env OTEL_TRACES_EXPORTER=none)"))
    export_timeout_ms: int = Field(2000, ge=100, le=MAX_INT)
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description=(
        "share of new traces recorded (trace-id ratio); an incoming traceparent's sampled flag wins"))


class AccessLogConfig(_Strict):
    path: str = Field(..., min_length=1, description='"-" for standard output, else a file (appended to)')


class ObservabilityConfig(_Strict):
    enabled: bool = True
    service_name: str = "aisix"
    metrics: MetricsConfig = MetricsConfig()
    traces: TracesConfig = TracesConfig()
    queue_size: int = Field(65_536, ge=1, le=MAX_INT, description="telemetry records waiting for the batcher; more are dropped")
    price_table: bool = Field(True, description="price models without `pricing` from genai-prices' table "
                              "(~30 MB per process); false: only models' own `pricing` is counted")
    access_log: AccessLogConfig | None = Field(None, description="one JSON line per request, written by the batcher; off when absent")


class Config(_Strict):
    """The whole configuration. ``models``/``apikeys`` are upserted into the store at start-up."""

    server: ServerConfig = ServerConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    models: list[Model] = []
    apikeys: list[ApiKeyWrite] = []
    #: where the config came from (a path, or "embedded default"), for messages
    source: str = Field("embedded default", exclude=True)

    @field_validator("models", "apikeys", mode="before")
    @classmethod
    def _null_is_empty(cls, v):
        """``models:`` with no value (YAML null) means no models, not an error."""
        return [] if v is None else v

    @field_validator("apikeys")
    @classmethod
    def _keys_given(cls, v: list[ApiKeyWrite]) -> list[ApiKeyWrite]:
        """A config file's API key names its secret (there is no response to hand a generated one out)."""
        for i, k in enumerate(v):
            if k.key is None:
                raise ValueError(f"entry {i}: `key` is required here (the Admin API can generate one)")
        return v


def _format_errors(source: str, err: ValidationError) -> str:
    """One line per faulty field, under the file's name."""
    lines = [f"{source}: invalid configuration"]
    lines += [f"  field `{where}`: {msg}" for where, msg in validation_problems(err, "(top level)")]
    return "\n".join(lines)


def apply_env(config: Config, env=os.environ) -> Config:
    """Apply the standard ``OTEL_*`` variables over the file's values (env wins): the OTLP
    endpoints, ``OTEL_{METRICS,TRACES}_EXPORTER`` (``otlp`` | ``none``), the service name, the
    sampler, ``OTEL_SDK_DISABLED`` (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/).
    Raises :class:`ConfigError` for a value it cannot use."""
    obs = config.observability
    if v := env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        obs.metrics.otlp_endpoint = v
    if v := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        obs.traces.otlp_endpoint = v
    for name, part in (("OTEL_METRICS_EXPORTER", obs.metrics), ("OTEL_TRACES_EXPORTER", obs.traces)):
        exporter = env.get(name, "").strip().lower()
        if exporter == "none":
            part.otlp_endpoint = None
        elif exporter not in ("", "otlp"):
            raise ConfigError(f"{name}: {env[name]!r} is not supported here (otlp or none)")
    if v := env.get("OTEL_SERVICE_NAME"):
        obs.service_name = v
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("always_on", "parentbased_always_on"):
        obs.traces.sample_ratio = 1.0
    elif sampler in ("always_off", "parentbased_always_off"):
        obs.traces.sample_ratio = 0.0
    elif sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            obs.traces.sample_ratio = min(1.0, max(0.0, float(env.get("OTEL_TRACES_SAMPLER_ARG", "1"))))
        except ValueError:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: not a number: {env.get('OTEL_TRACES_SAMPLER_ARG')!r}") from None
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        obs.enabled = False
    return config


def load_config(path: str, env=os.environ) -> Config:
    """Read and validate a YAML (or JSON) config file. Raises :class:`ConfigError`."""
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(doc).__name__}")
    try:
        config = Config.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None
    config.source = path
    for kind, unique in (("models", "name"), ("apikeys", "key")):
        seen = set()
        for i, obj in enumerate(getattr(config, kind)):
            value = getattr(obj, unique)
            if value in seen:
                raise ConfigError(f"{path}: invalid configuration\n  field `{kind}.{i}.{unique}`: "
                                  f"duplicate {unique} {'(hidden)' if kind == 'apikeys' else repr(value)}")
            seen.add(value)
    by_name = {m.name: m for m in config.models}
    problems = [f"  field `models.{i}.{where}`: {reason}" for i, m in enumerate(config.models)
                for where, reason in fallback_problems(m, by_name)]
    if problems:
        raise ConfigError("\n".join([f"{path}: invalid configuration", *problems]))
    return apply_env(config, env)


def embedded_default(data_dir: str = "./aisix-data", env=os.environ) -> tuple[Config, dict]:
    """The no-config default: loopback only, a ``mock`` model, keys generated on first start.

    The admin key and the client key are kept in ``{data_dir}/credentials.json`` (mode 0600) and
    reused on later starts. Returns ``(config, {"admin_key", "client_key"})``.
    """
    os.makedirs(data_dir, exist_ok=True)
    cred_path = os.path.join(data_dir, "credentials.json")
    try:
        with open(cred_path) as f:
            creds = json.load(f)
        assert isinstance(creds.get("admin_key"), str) and isinstance(creds.get("client_key"), str)
    except FileNotFoundError:
        creds = {"admin_key": "admin-" + secrets.token_urlsafe(24), "client_key": new_client_key()}
        fd = os.open(cred_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"{cred_path}: corrupt credentials file; remove it to generate new keys") from e
    config = Config(
        deployment=DeploymentConfig(admin=AdminConfig(admin_key=[AdminKey(key=creds["admin_key"])]),
                                    file=FileProviderConfig(path=os.path.join(data_dir, "resources.json"))),
        models=[Model(name="mock", model="mock/mock-1",
                      provider_config={"ttft_ms": 200, "tpot_ms": 25, "tokens": 24})],
        apikeys=[ApiKeyWrite(key=creds["client_key"], allowed_models=["mock"])],
    )
    return apply_env(config, env), creds
