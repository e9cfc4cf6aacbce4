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
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Provider names a model's ``model`` field may start with. ``openai`` also covers any
#: OpenAI-compatible server reached through ``provider_config.api_base``.
PROVIDERS = ("openai", "deepseek", "anthropic", "gemini", "mock")

#: At most this many characters of a client key are kept for display (:func:`key_prefix`).
KEY_PREFIX_CHARS = 8

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


class _ApiKeyFields(BaseModel):
    """What an API key allows and until when; shared by the stored key and the write body."""

    model_config = ConfigDict(extra="forbid")
    allowed_models: list[str] = Field(..., description="model names this key may use; [] allows none")
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
