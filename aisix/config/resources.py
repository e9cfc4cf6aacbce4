"""The configured resources: models and API keys, as validated schemas.

Shapes follow AISIX (see the README's "Resources"): a **model** maps a client-facing
alias (``name``) to ``{provider}/{model_id}`` with its ``provider_config``; an **API key**
is the secret a client sends (stored only as its SHA-256) plus a strict ``allowed_models``
allow-list, an optional ``expires_at`` and a ``disabled`` switch. Both may carry a ``rate_limit``. These schemas serve the config file, the stores and the Admin API
(whose OpenAPI document is generated from them).
"""
from __future__ import annotations

import re
import secrets
from datetime import datetime
from functools import cached_property
from hashlib import sha256
from typing import Annotated, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: Provider names a model's ``model`` field may start with. ``openai`` also covers any
#: OpenAI-compatible server reached through ``provider_config.api_base``.
PROVIDERS = ("openai", "deepseek", "anthropic", "gemini", "mock")

#: The largest integer a field takes: int64, what JSON stores, etcd, OTLP and Redis all hold.
MAX_INT = 2**63 - 1
#: At most this many characters of a client key are kept for display (:func:`key_prefix`).
KEY_PREFIX_CHARS = 8

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


_USD_PER_M = dict(ge=0, le=1e9, allow_inf_nan=False)


class Pricing(BaseModel):
    """What the upstream charges, USD per million tokens; overrides the price table (genai-prices).
    Cached and cache-write rates default to the input rate (no discount)."""

    model_config = ConfigDict(extra="forbid")
    input_per_million: float = Field(..., **_USD_PER_M, description="prompt tokens not from the cache, USD per 1 M")
    output_per_million: float = Field(..., **_USD_PER_M, description="completion tokens (reasoning included), "
                                      "USD per 1 M")
    cached_input_per_million: float | None = Field(None, **_USD_PER_M, description="prompt tokens read from the "
                                                   "provider's prompt cache, USD per 1 M (default: the input rate)")
    cache_write_per_million: float | None = Field(None, **_USD_PER_M, description="prompt tokens written to the "
                                                  "prompt cache (Anthropic), USD per 1 M (default: the input rate)")


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
    pricing: Pricing | None = Field(None, description="this deployment's prices (default: the model's `pricing`, "
                                    "else the price table)")
    rate_limit: RateLimit | None = Field(None, description="this deployment's own capacity (rpm, tpm, concurrency; "
                                         "counted per process, or in Redis with rate_limit_store redis): a deployment without room is skipped")

    @field_validator("rate_limit")
    @classmethod
    def _capacity(cls, v: RateLimit | None) -> RateLimit | None:
        if v is not None and (v.rpd is not None or v.tpd is not None):
            raise ValueError("a deployment's capacity takes rpm, tpm and concurrency (rpd and tpd are for keys "
                             "and models)")
        return v

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
    pricing: Pricing | None = Field(None, description="USD per million tokens, over the price table "
                                    "(genai-prices); neither: no cost is counted")
    _targets: tuple = PrivateAttr(())
    _deployment: str = PrivateAttr("default")
    _capacity: RateLimit | None = PrivateAttr(None)
    _weight: int = PrivateAttr(1)

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str) -> str:
        return _model_name(v)

    @field_validator("model")
    @classmethod
    def _provider_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and "deployments" in info.data and info.data["deployments"] is None:  # (absent, not invalid)
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
        return self  # `fallbacks` name other models: checked among them, by fallback_problems

    def model_post_init(self, context) -> None:
        if self.deployments is None:
            self._targets = (self,)
            return
        targets = []
        for d in self.deployments:
            t = Model.model_construct(name=self.name, model=d.model, provider_config=d.provider_config,
                                      deployments=None, routing=self.routing, fallbacks=[], rate_limit=None, id=None,
                                      pricing=d.pricing or self.pricing)
            t._deployment = d.id
            t._capacity, t._weight = d.rate_limit, d.weight
            t._targets = (t,)
            targets.append(t)
        self._targets = tuple(targets)

    @property
    def targets(self) -> tuple["Model", ...]:
        """The deployments as one-upstream models, in configured order."""
        return self.__pydantic_private__["_targets"]  # (self._targets goes through BaseModel.__getattr__: ~1.8 µs)

    @property
    def deployment_id(self) -> str:
        """This target's deployment id (``default`` for the one-upstream shape)."""
        return self.__pydantic_private__["_deployment"]

    @property
    def weight(self) -> int:
        """This target's deployment ``weight`` (1 for the one-upstream shape)."""
        return self.__pydantic_private__["_weight"]

    @property
    def capacity(self) -> RateLimit | None:
        """This target's deployment ``rate_limit`` (None: no limit of its own)."""
        return self.__pydantic_private__["_capacity"]

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
        return (self.model or self.targets[0].model).partition("/")[0]

    @property
    def model_id(self) -> str:
        return (self.model or self.targets[0].model).partition("/")[2]


def fallback_problems(model: Model, models: Mapping[str, Model]) -> list[tuple[str, str]]:
    """What is wrong with ``model.fallbacks`` among ``models`` (the models by name that ``model``
    is written next to; its own entry, if there, is not read): ``[("fallbacks.N", reason)]`` for
    each name that is the model's own, named twice, no model of ``models``, or leads back to the
    model over the other models' fallbacks (a cycle, A → B → A); ``[]`` when every name is good.
    The one check of the config file (:func:`aisix.config.loader.load_config`) and the Admin API."""
    out = []
    for i, name in enumerate(model.fallbacks):
        where = f"fallbacks.{i}"
        if name == model.name:
            out.append((where, f"`{name}` is this model itself"))
        elif name in model.fallbacks[:i]:
            out.append((where, f"`{name}` is named twice"))
        elif name not in models:
            out.append((where, f"unknown model `{name}` (a fallback must name a configured model; create it first)"))
        elif (path := _fallback_path(name, model.name, models)) is not None:
            out.append((where, f"`{name}` falls back to this model: a cycle ({' → '.join([model.name, *path])})"))
    return out


def _fallback_path(start: str, goal: str, models: Mapping[str, Model]) -> list[str] | None:
    """The names from ``start`` to ``goal`` following ``fallbacks`` (depth first, each model once), or None."""
    stack, seen = [[start]], {start}
    while stack:
        path = stack.pop()
        m = models.get(path[-1])
        for name in m.fallbacks if m is not None else ():
            if name == goal:
                return [*path, name]
            if name not in seen:
                seen.add(name)
                stack.append([*path, name])
    return None


class _ApiKeyFields(BaseModel):
    """What an API key allows and until when; shared by the stored key and the write body."""

    model_config = ConfigDict(extra="forbid")
    allowed_models: list[ModelName] = Field(..., description="model names this key may use; [] allows none")
    rate_limit: RateLimit | None = None
    expires_at: str | None = Field(
        None, description="RFC 3339 date-time with an offset (e.g. `2026-01-31T00:00:00Z`); from then on "
        "the key gets 401 `expired_api_key`", json_schema_extra={"format": "date-time"})
    disabled: bool = Field(False, description="a disabled key gets 401 `disabled_api_key`")

    @field_validator("expires_at")
    @classmethod
    def _rfc3339(cls, v: str | None) -> str | None:
        if v is not None:
            parse_rfc3339(v)
        return v


class ApiKey(_ApiKeyFields):
    """A client API key as the store keeps it and the proxy serves it: never the secret, only its
    SHA-256 (``key_hash``, 64 hex digits, :func:`hash_key`) and a short display prefix
    (``key_prefix``, :func:`key_prefix`). Clients send the secret as ``Authorization: Bearer <key>``."""

    id: str | None = Field(None, description="assigned on create (UUID)", json_schema_extra={"readOnly": True})
    key_hash: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex")
    key_prefix: str = Field("", max_length=KEY_PREFIX_CHARS, description="the key's first characters, for display")

    @cached_property
    def expires_ts(self) -> float | None:
        """``expires_at`` as Unix seconds (None: never expires); computed once per stored version."""
        return None if self.expires_at is None else parse_rfc3339(self.expires_at).timestamp()


class ApiKeyWrite(_ApiKeyFields):
    """A client API key as the Admin API reads and writes it: ``key`` is the secret clients send as
    ``Authorization: Bearer <key>``, stored only as its SHA-256. A create without ``key`` generates
    one, a replace without it keeps the stored one. ``id`` and ``key_prefix`` are read-only (a GET,
    edit, PUT round trip may send them back; they are ignored)."""

    # The config file's ``apikeys`` entries use it too (``key`` required there); :meth:`stored` is
    # the stored shape (:class:`ApiKey`).

    id: str | None = Field(None, description="assigned on create (UUID)", json_schema_extra={"readOnly": True})
    key: str | None = Field(
        None, min_length=1, max_length=512, json_schema_extra={"pattern": _KEY_PATTERN},
        description="the secret clients send (no whitespace or control characters, no `Bearer ` prefix). "
        "Write-only: stored as a SHA-256 and shown only in the response to the write that set it. "
        "Left out: generated on create, kept on replace")
    key_prefix: str | None = Field(None, description="the key's first characters, for display",
                                   json_schema_extra={"readOnly": True})

    @field_validator("key")
    @classmethod
    def _usable_key(cls, v: str | None) -> str | None:
        """A key a client can send as ``Authorization: Bearer <key>`` and that matches as sent."""
        if v is None:
            return v
        if _BEARER.match(v):
            raise ValueError("must be the key itself, without the `Bearer ` scheme (clients add it)")
        if v != v.strip():
            raise ValueError("must not start or end with whitespace")
        if any(c.isspace() for c in v):
            raise ValueError("must not contain whitespace")
        return _no_control(v)

    def settings(self) -> dict:
        """The fields this write set, JSON-ready, without ``id``, ``key`` and ``key_prefix``."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"id", "key", "key_prefix"})

    def stored(self, secret: str) -> dict:
        """The stored shape for this key with ``secret``: :meth:`settings` plus ``key_hash`` and
        ``key_prefix``; never the secret, never ``id``."""
        return {"key_hash": hash_key(secret), "key_prefix": key_prefix(secret), **self.settings()}


def hash_key(secret: str) -> str:
    """The SHA-256 of a client key's UTF-8 bytes, 64 lower-case hex digits: how the store and the
    snapshot know a key. Any ``str`` hashes (lone surrogates, from undecodable header bytes, pass
    through), so a presented bearer never raises."""
    return sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def key_prefix(secret: str) -> str:
    """The non-secret display prefix of a key: its first characters, at most
    :data:`KEY_PREFIX_CHARS` and at most a quarter of the key (``sk-`` + 32 → ``sk-AbCdE``)."""
    return secret[:min(KEY_PREFIX_CHARS, len(secret) // 4)]


def stored_api_key(obj: dict) -> dict:
    """A stored API key dict in today's shape: one written in plaintext by an older aisix (a ``key``
    field and no ``key_hash``) becomes ``key_hash`` + ``key_prefix``, the secret dropped. Anything
    else is returned as it is (the same object)."""
    secret = obj.get("key")
    if not isinstance(secret, str):
        return obj
    rest = {k: v for k, v in obj.items() if k != "key"}
    return {**rest, "key_hash": hash_key(secret), "key_prefix": key_prefix(secret)}


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 ``date-time`` (https://www.rfc-editor.org/rfc/rfc3339#section-5.6; the offset
    is required) as an aware datetime. Raises ValueError saying what is expected."""
    if not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. `2026-01-31T00:00:00Z`")
    try:
        return datetime.fromisoformat(value.upper().replace(" ", "T"))
    except ValueError as e:
        raise ValueError(f"is not a valid date-time ({e})") from None


def new_client_key() -> str:
    """A fresh client API key: ``sk-`` + 32 URL-safe characters from :mod:`secrets` (192 bits)."""
    return "sk-" + secrets.token_urlsafe(24)


Kind = Literal["models", "apikeys"]
#: The stored (and served) shape of each kind.
SCHEMAS: dict[str, type[BaseModel]] = {"models": Model, "apikeys": ApiKey}
#: The shape the Admin API and the config file write (an API key's secret becomes its hash).
WRITE_SCHEMAS: dict[str, type[BaseModel]] = {"models": Model, "apikeys": ApiKeyWrite}
#: The field that must be unique within each kind (in the stored shape).
UNIQUE_FIELD = {"models": "name", "apikeys": "key_hash"}


def validation_problems(err, top: str = "(body)") -> list[tuple[str, str]]:
    """A pydantic ``ValidationError`` as ``[(field path "a.0.b", reason)]``, one per fault; the
    one formatter of the Admin API's, the store's and the config file's errors. No reason repeats
    the input (it may hold a secret); ``top`` names a fault of the whole document."""
    out = []
    for e in err.errors(include_url=False, include_input=False):
        msg = e["msg"].removeprefix("Value error, ")
        out.append((".".join(str(p) for p in e["loc"]) or top, "unknown field" if e["type"] == "extra_forbidden" else msg))
    return out


def describe_validation_error(err) -> tuple[str, str | None]:
    """A pydantic ``ValidationError`` as ``(message, first field)``; the message names every
    faulty field (``field `a.b`: reason``) and never repeats the input (it may hold a secret)."""
    problems = validation_problems(err)
    return "; ".join(f"field `{where}`: {msg}" for where, msg in problems) or "invalid body", \
        problems[0][0] if problems else None


def mask_url_userinfo(url: str) -> str:
    """``url`` as responses show it: credentials in it (``user:pw@``) become ``****@``; a URL
    without them is returned as it is."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    return f"{scheme}://****@{authority.rpartition('@')[2]}{slash}{path}"


def url_origin(url: str) -> tuple[str, str, int | None]:
    """The origin a URL sends requests to (RFC 6454 §4): ``(scheme, host, port)``, lower-cased,
    the scheme's default port filled in (80 for http, 443 for https). Credentials and path do not
    count. Raises ValueError on a URL :func:`urllib.parse.urlsplit` cannot read."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


def mask_secret(secret: str) -> str:
    """What responses show instead of a provider's ``api_key``: ``****`` plus its last four
    characters when it is long enough for those not to give it away."""
    return "****" + secret[-4:] if len(secret) >= 16 else "****"
