"""The configured resources: models and API keys, as validated schemas.

Shapes follow AISIX (see the README's "Resources"): a **model** maps a client-facing
alias (``name``) to ``{provider}/{model_id}`` with its ``provider_config``; an **API key**
is the secret a client sends plus a strict ``allowed_models`` allow-list. Both may carry
a ``rate_limit``. These schemas serve the config file, the stores and the Admin API
(whose OpenAPI document is generated from them).
"""
from __future__ import annotations

import re
import secrets
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

#: Provider names a model's ``model`` field may start with. ``openai`` also covers any
#: OpenAI-compatible server reached through ``provider_config.api_base``.
PROVIDERS = ("openai", "deepseek", "anthropic", "gemini", "mock")

#: The largest integer a field takes: int64, what JSON stores, etcd, OTLP and Redis all hold.
MAX_INT = 2**63 - 1
PositiveInt = Annotated[int, Field(ge=1, le=MAX_INT)]

#: C0 and C1 control characters and DEL (Unicode category Cc)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BEARER = re.compile(r"(?i)bearer\s")
#: the same rules for the OpenAPI document (ECMA-262 syntax, which these are too)
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
_NAME_PATTERN = r"^(?!\s)[^\x00-\x1f\x7f-\x9f]*(?<!\s)$"
_KEY_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f]+$"
_URL_PATTERN = r"^https?://[^\s/?#]+[^\s?#]*$"


def _no_control(v: str | None) -> str | None:
    if v is not None and _CONTROL.search(v):
        raise ValueError("must not contain control characters")
    return v


def _model_name(v: str) -> str:
    """A model name as clients send it: no control characters, nothing around it that would make
    a look-alike (``"m1 "`` is not ``"m1"``, yet would show as it in logs and metric labels)."""
    _no_control(v)
    if v != v.strip():
        raise ValueError("must not start or end with whitespace")
    return v


#: A model name where one is referred to (``allowed_models``): the rules of :attr:`Model.name`.
ModelName = Annotated[str, AfterValidator(_model_name), Field(json_schema_extra={"pattern": _NAME_PATTERN})]


class RateLimit(BaseModel):
    """Limits on one key or model. Counts: requests (rpm/rpd), tokens (tpm/tpd), in-flight requests."""

    model_config = ConfigDict(extra="forbid")
    rpm: PositiveInt | None = Field(None, description="requests per minute")
    rpd: PositiveInt | None = Field(None, description="requests per day")
    tpm: PositiveInt | None = Field(None, description="tokens per minute (prompt + completion)")
    tpd: PositiveInt | None = Field(None, description="tokens per day (prompt + completion)")
    concurrency: PositiveInt | None = Field(None, description="requests in flight at once, streams included")


class ProviderConfig(BaseModel):
    """How to reach the upstream. Times in ms.

    ``api_key`` is a secret: never logged, never in traces or metrics. Provider-specific
    settings (e.g. the mock's ``ttft_ms``) are allowed as extra fields.
    """

    model_config = ConfigDict(extra="allow")
    api_key: str | None = Field(None, description="the upstream's API key (secret)",
                                json_schema_extra={"pattern": _NO_CONTROL_PATTERN})
    api_base: str | None = Field(None, description="base URL, e.g. https://api.openai.com/v1 "
                                 "(http or https, a host, no query or fragment)",
                                 json_schema_extra={"pattern": _URL_PATTERN})
    connect_timeout_ms: PositiveInt = Field(10_000, description="TCP/TLS connect timeout, ms")
    read_timeout_ms: PositiveInt = Field(600_000, description="longest wait for any upstream byte, ms (504 after)")
    stream_idle_timeout_ms: PositiveInt = Field(
        300_000, description="a stream with no data event for this long is ended, ms (comments do not count)")
    stream_usage: Literal["auto", "always", "never"] = Field(
        "auto", description="OpenAI-compatible upstreams: ask for usage in streams (stream_options.include_usage); "
        "auto: ask, and if the upstream answers 400 naming stream_options, retry once without it and remember; "
        "never: don't ask (the gateway estimates usage)")
    max_response_bytes: PositiveInt = Field(
        32 * 1024 * 1024, description="the largest upstream body read whole (a non-streamed answer, an error, "
        "a non-SSE answer to a stream), bytes; 502 upstream_response_too_large over it")

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, v: str | None) -> str | None:
        return _no_control(v)  # it goes into a request header as it is

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        """A URL the upstream clients can use, request paths appended to it: http(s), a host, a
        valid port, no whitespace, no query or fragment. A trailing ``/`` is dropped (and what is
        left is still valid, so a stored value always validates again)."""
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        if _CONTROL.search(v) or any(c.isspace() for c in v):
            raise ValueError("must not contain whitespace or control characters")
        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError:
            raise ValueError("is not a valid URL (bad host or port)") from None
        if not parts.hostname:
            raise ValueError("must name a host, e.g. http://127.0.0.1:8000/v1")
        if port == 0:
            raise ValueError("port must be 1-65535")
        if "?" in v or "#" in v:
            raise ValueError("must not have a query or a fragment (request paths are appended to it)")
        return v.rstrip("/")


def _provider_model(v: str) -> str:
    """``{provider}/{model_id}`` with a known provider. Raises ValueError."""
    provider, sep, model_id = v.partition("/")
    if not sep or not model_id:
        raise ValueError("must be `{provider}/{model_id}`, e.g. `openai/gpt-4o-mini`")
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider `{provider}` (known: {', '.join(PROVIDERS)})")
    return v


_MODEL_PATTERN = f"^({'|'.join(PROVIDERS)})/.+$"
_DEPLOYMENT_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Failures a deployment attempt can have that ``routing.retry_on`` may name besides HTTP statuses.
RETRY_KINDS = ("connect_error", "timeout")
#: Upstream statuses never retried whatever ``retry_on`` says: the request itself is at fault.
NEVER_RETRIED = frozenset({400, 401, 403, 404, 413, 422})


class Deployment(BaseModel):
    """One upstream serving a model alias: where to send it, and its share of the traffic."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., description="unique within the model; the `deployment` label of the metrics",
                    json_schema_extra={"pattern": _DEPLOYMENT_ID})
    model: str = Field(..., description="`{provider}/{model_id}`", json_schema_extra={"pattern": _MODEL_PATTERN})
    provider_config: ProviderConfig = Field(default_factory=ProviderConfig)
    weight: int = Field(1, ge=1, le=1_000_000, description="share of the traffic under `weighted` (default 1)")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not re.fullmatch(_DEPLOYMENT_ID, v):
            raise ValueError("must be 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
        return v

    _check_model = field_validator("model")(classmethod(lambda cls, v: _provider_model(v)))


class Routing(BaseModel):
    """How a model's deployments share requests and what happens when one fails (before the
    first byte went to the client; a stream under way is never replayed)."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["weighted", "round_robin", "least_busy", "lowest_latency"] = Field(
        "weighted", description="weighted: random by weight; round_robin: in turn; least_busy: fewest in flight; "
        "lowest_latency: lowest moving average of the time to the upstream's first byte")
    retries: int = Field(2, ge=0, le=10, description="further attempts after the first, across deployments")
    retry_on: list[Literal["connect_error", "timeout"] | Annotated[int, Field(ge=400, le=599)]] = Field(
        ["connect_error", "timeout", 429, 500, 502, 503, 504],
        description="failures that are retried: connect_error, timeout, or an upstream HTTP status "
        "(400, 401, 403, 404, 413 and 422 never are)")
    allowed_fails: PositiveInt = Field(3, description="failures of one deployment within cooldown_ms that put it "
                                       "in cooldown")
    cooldown_ms: int = Field(30_000, ge=0, le=86_400_000, description="how long a failing deployment is skipped, ms")


class Model(BaseModel):
    """A model alias. Either one upstream, ``model`` (``{provider}/{model_id}``, e.g.
    ``openai/gpt-4o-mini``) with its ``provider_config``, or several ``deployments`` with
    ``routing``; ``fallbacks`` are other aliases tried in order when every deployment failed.

    :attr:`targets` is the model as its deployments, each a one-upstream ``Model`` (same
    ``name``) whose :attr:`deployment_id` says which; the one-upstream shape is one target,
    ``default``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["model"], "not": {"required": ["deployments"]}},
                  {"required": ["deployments"], "not": {"required": ["model"]}}]})
    id: str | None = Field(None, description="assigned on create (UUID)", json_schema_extra={"readOnly": True})
    name: str = Field(..., min_length=1, max_length=256, description="the alias clients send as `model` "
                      "(no control characters, no leading or trailing whitespace)",
                      json_schema_extra={"pattern": _NAME_PATTERN})
    deployments: list[Deployment] | None = Field(None, min_length=1, max_length=64,
                                                 description="several upstreams for this alias (instead of `model`)")
    model: str | None = Field(None, validate_default=True, description="`{provider}/{model_id}` (or give "
                              "`deployments`)", json_schema_extra={"pattern": _MODEL_PATTERN})
    provider_config: ProviderConfig = Field(default_factory=ProviderConfig)
    routing: Routing = Field(default_factory=Routing)
    fallbacks: list[ModelName] = Field([], max_length=16, description="other aliases tried in order when every "
                                 "deployment of this one failed")
    rate_limit: RateLimit | None = None
    _targets: tuple = PrivateAttr(())
    _deployment: str = PrivateAttr("default")

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str) -> str:
        return _model_name(v)

    @field_validator("model")
    @classmethod
    def _provider_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("deployments") is None:
            raise PydanticCustomError("missing", "Field required")  # one upstream, `model`, or `deployments`
        return v if v is None else _provider_model(v)

    @model_validator(mode="after")
    def _one_shape(self) -> "Model":
        if self.deployments is not None:
            if self.model is not None or self.provider_config != ProviderConfig():
                raise ValueError("give either `model` with `provider_config`, or `deployments`, not both")
            ids = [d.id for d in self.deployments]
            if len(set(ids)) != len(ids):
                raise ValueError("deployment ids must be unique within the model")
        if self.name in self.fallbacks or len(set(self.fallbacks)) != len(self.fallbacks):
            raise ValueError("`fallbacks` must name other models, each once")
        return self

    def model_post_init(self, context) -> None:
        if self.deployments is None:
            self._targets = (self,)
            return
        targets = []
        for d in self.deployments:
            t = Model.model_construct(name=self.name, model=d.model, provider_config=d.provider_config,
                                      deployments=None, routing=self.routing, fallbacks=[], rate_limit=None, id=None)
            t._deployment = d.id
            t._targets = (t,)
            targets.append(t)
        self._targets = tuple(targets)

    @property
    def targets(self) -> tuple["Model", ...]:
        """The deployments as one-upstream models, in configured order."""
        return self._targets

    @property
    def deployment_id(self) -> str:
        """This target's deployment id (``default`` for the one-upstream shape)."""
        return self._deployment

    @property
    def retries(self) -> int:
        """Further attempts after the first: ``routing.retries``, but 0 for a one-upstream model
        that sets no ``routing`` (as before routing existed: the client's SDK does its own retries)."""
        if self.deployments is None and "routing" not in self.model_fields_set:
            return 0
        return self.routing.retries

    @property
    def provider(self) -> str:
        """The provider of the (first) upstream."""
        return (self.model or self._targets[0].model).partition("/")[0]

    @property
    def model_id(self) -> str:
        return (self.model or self._targets[0].model).partition("/")[2]


class ApiKey(BaseModel):
    """A client API key: ``key`` is the secret sent as ``Authorization: Bearer <key>``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="assigned on create (UUID)", json_schema_extra={"readOnly": True})
    key: str = Field(..., min_length=1, max_length=512,
                     description="the secret clients send (no whitespace or control characters, no `Bearer ` prefix)",
                     json_schema_extra={"pattern": _KEY_PATTERN})
    allowed_models: list[ModelName] = Field(..., description="model names this key may use; [] allows none")
    rate_limit: RateLimit | None = None

    @field_validator("key")
    @classmethod
    def _usable_key(cls, v: str) -> str:
        """A key a client can send as ``Authorization: Bearer <key>`` and that matches as sent."""
        if _BEARER.match(v):
            raise ValueError("must be the key itself, without the `Bearer ` scheme (clients add it)")
        if v != v.strip():
            raise ValueError("must not start or end with whitespace")
        if any(c.isspace() for c in v):
            raise ValueError("must not contain whitespace")
        return _no_control(v)


def new_client_key() -> str:
    """A fresh client API key: ``sk-`` + 32 URL-safe characters from :mod:`secrets` (192 bits)."""
    return "sk-" + secrets.token_urlsafe(24)


Kind = Literal["models", "apikeys"]
SCHEMAS: dict[str, type[BaseModel]] = {"models": Model, "apikeys": ApiKey}
#: The field that must be unique within each kind.
UNIQUE_FIELD = {"models": "name", "apikeys": "key"}


def describe_validation_error(err) -> tuple[str, str | None]:
    """A pydantic ``ValidationError`` as ``(message, first field)``; the message names every
    faulty field (``field `a.b`: reason``) and never repeats the input (it may hold a secret)."""
    parts, first = [], None
    for e in err.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in e["loc"]) or "(body)"
        first = first or where
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"field `{where}`: {msg}")
    return "; ".join(parts) or "invalid body", first


def mask_secret(secret: str) -> str:
    """What responses show instead of a provider's ``api_key``: ``****`` plus its last four
    characters when it is long enough for those not to give it away."""
    return "****" + secret[-4:] if len(secret) >= 16 else "****"
