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

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Provider names a model's ``model`` field may start with. ``openai`` also covers any
#: OpenAI-compatible server reached through ``provider_config.api_base``.
PROVIDERS = ("openai", "deepseek", "anthropic", "gemini", "mock")

PositiveInt = Annotated[int, Field(ge=1)]

#: C0 and C1 control characters and DEL (Unicode category Cc)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BEARER = re.compile(r"(?i)bearer\s")
#: the same rules for the OpenAPI document (ECMA-262 syntax, which these are too)
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
_KEY_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f]+$"
_URL_PATTERN = r"^https?://[^\s/?#]+[^\s?#]*$"


def _no_control(v: str | None) -> str | None:
    if v is not None and _CONTROL.search(v):
        raise ValueError("must not contain control characters")
    return v


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


class Model(BaseModel):
    """A model alias. ``model`` is ``{provider}/{model_id}``, e.g. ``openai/gpt-4o-mini``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="assigned on create (UUID)", json_schema_extra={"readOnly": True})
    name: str = Field(..., min_length=1, max_length=256, description="the alias clients send as `model`",
                      json_schema_extra={"pattern": _NO_CONTROL_PATTERN})
    model: str = Field(..., description="`{provider}/{model_id}`",
                       json_schema_extra={"pattern": f"^({'|'.join(PROVIDERS)})/.+$"})
    provider_config: ProviderConfig = Field(default_factory=ProviderConfig)
    rate_limit: RateLimit | None = None

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str) -> str:
        return _no_control(v)

    @field_validator("model")
    @classmethod
    def _provider_model(cls, v: str) -> str:
        provider, sep, model_id = v.partition("/")
        if not sep or not model_id:
            raise ValueError("must be `{provider}/{model_id}`, e.g. `openai/gpt-4o-mini`")
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider `{provider}` (known: {', '.join(PROVIDERS)})")
        return v

    @property
    def provider(self) -> str:
        return self.model.partition("/")[0]

    @property
    def model_id(self) -> str:
        return self.model.partition("/")[2]


class ApiKey(BaseModel):
    """A client API key: ``key`` is the secret sent as ``Authorization: Bearer <key>``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="assigned on create (UUID)", json_schema_extra={"readOnly": True})
    key: str = Field(..., min_length=1, max_length=512,
                     description="the secret clients send (no whitespace or control characters, no `Bearer ` prefix)",
                     json_schema_extra={"pattern": _KEY_PATTERN})
    allowed_models: list[str] = Field(..., description="model names this key may use; [] allows none")
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
