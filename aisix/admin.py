"""The Admin API (control plane): create, list, get, upsert and delete models and API keys.

Routes, under ``/aisix/admin`` (``{kind}`` is ``models`` or ``apikeys``)::

    POST   /aisix/admin/{kind}        201 the stored object with its new id
    GET    /aisix/admin/{kind}        200 {"total": n, "list": [...]}
    GET    /aisix/admin/{kind}/{id}   200 the object | 404
    PUT    /aisix/admin/{kind}/{id}   201 created | 200 replaced
    DELETE /aisix/admin/{kind}/{id}   200 {"id", "deleted": true} | 404
    GET    /openapi                   the OpenAPI 3.1 document (no auth: it holds no data)

Every other path needs ``Authorization: Bearer <admin key>`` (``deployment.admin.admin_key``,
compared in constant time), else 401. Bodies are validated strictly against the pydantic
schemas in :mod:`aisix.resources`; errors use the OpenAI envelope and name the field:
bad JSON or a bad field → 400, name/key taken → 409, unknown id → 404, store down → 503.

Secrets: ``provider_config.api_key`` is never logged and responses show it masked
(:func:`~aisix.resources.mask_secret`); a PUT that sends back the masked value keeps the
stored key, so a GET → edit → PUT round trip is safe. Client API keys (``key``) are returned
as they are: they are what the Admin API manages. A ``POST`` of an API key without ``key``
generates one (``sk-`` and 32 random URL-safe characters) and returns it.
"""
from __future__ import annotations

import hmac
import logging
import re
import uuid

import orjson
from aiohttp import web
from pydantic import ValidationError

from .errors import GatewayError, error_type_for, invalid_request
from .gateway import GATEWAY
from .openapi import ADMIN_PREFIX, openapi_document
from .resources import SCHEMAS, describe_validation_error, mask_secret, new_client_key
from .store import ConflictError, StoreError, StoreUnavailable

log = logging.getLogger("aisix.admin")

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KIND = "{kind:models|apikeys}"
_NOUN = {"models": "model", "apikeys": "API key"}
_ADMIN_KEYS = web.AppKey("admin_keys", tuple)
_MAX_BODY = 1024 * 1024


def create_admin_app(gateway) -> web.Application:
    """The Admin API as an aiohttp app; the server mounts it on ``server.admin.listen``."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=_MAX_BODY)
    app[GATEWAY] = gateway
    app[_ADMIN_KEYS] = tuple(k.key.encode() for k in gateway.config.deployment.admin.admin_key)
    app.router.add_get("/openapi", _openapi)
    app.router.add_get(f"{ADMIN_PREFIX}/{_KIND}", _list)
    app.router.add_post(f"{ADMIN_PREFIX}/{_KIND}", _create)
    app.router.add_get(f"{ADMIN_PREFIX}/{_KIND}/{{id}}", _get)
    app.router.add_put(f"{ADMIN_PREFIX}/{_KIND}/{{id}}", _put)
    app.router.add_delete(f"{ADMIN_PREFIX}/{_KIND}/{{id}}", _delete)
    return app


# -- middlewares -------------------------------------------------------------------
@web.middleware
async def _errors(request: web.Request, handler):
    """Every failure as an OpenAI error envelope (aiohttp's own 404/405/413 included)."""
    try:
        return await handler(request)
    except GatewayError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        message = {404: f"no such path: {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: f"request body larger than {_MAX_BODY} bytes"}.get(e.status, e.reason)
        return GatewayError(e.status, message, error_type_for(e.status), code, headers).response()


@web.middleware
async def _auth(request: web.Request, handler):
    if request.path != "/openapi":
        _check_admin_key(request.headers.get("Authorization"), request.app[_ADMIN_KEYS])
    return await handler(request)


def _check_admin_key(header: str | None, keys: tuple[bytes, ...]) -> None:
    """Raise 401 unless ``header`` is ``Bearer <one of keys>`` (constant-time compares, all keys tried)."""
    challenge = {"WWW-Authenticate": 'Bearer realm="aisix-admin"'}
    if not keys:
        raise GatewayError(401, "the Admin API is disabled: no deployment.admin.admin_key is configured",
                           "authentication_error", "admin_api_disabled", challenge)
    scheme, _, token = (header or "").strip().partition(" ")
    if not header or not token.strip():
        raise GatewayError(401, "missing admin key: send `Authorization: Bearer <admin key>`",
                           "authentication_error", "missing_admin_key", challenge)
    try:  # aiohttp keeps bytes that are not UTF-8 as surrogate escapes: back to those bytes
        given = token.strip().encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # not from the wire (a lone surrogate): no key matches it
        given = None
    ok = False
    for key in keys:
        ok |= given is not None and hmac.compare_digest(given, key)
    if not ok or scheme.lower() != "bearer":
        raise GatewayError(401, "invalid admin key", "authentication_error", "invalid_admin_key", challenge)


# -- handlers --------------------------------------------------------------------------
_OPENAPI_BYTES: bytes | None = None


async def _openapi(request: web.Request) -> web.Response:
    global _OPENAPI_BYTES
    if _OPENAPI_BYTES is None:
        _OPENAPI_BYTES = orjson.dumps(openapi_document())
    return web.Response(body=_OPENAPI_BYTES, content_type="application/json")


async def _list(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    items = [_public(kind, obj) for obj in _store(request).list(kind)]
    return _json({"total": len(items), "list": items})


async def _get(request: web.Request) -> web.Response:
    kind, rid = request.match_info["kind"], _path_id(request)
    obj = _store(request).get(kind, rid)
    if obj is None:
        raise _not_found(kind, rid)
    return _json(_public(kind, obj))


async def _create(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    doc = await _read_object(request)
    if doc.get("id") is not None:
        raise invalid_request("field `id`: assigned by the server on create; "
                              f"use PUT {ADMIN_PREFIX}/{kind}/{{id}} to choose one", "invalid_field", "id")
    if kind == "apikeys" and "key" not in doc:
        doc["key"] = new_client_key()  # returned in the response: the caller's only copy to hand out
    obj = _validate(kind, doc)
    rid = str(uuid.uuid4())
    stored, _ = await _write(request, kind, rid, obj)
    log.info("admin: created %s %s", _NOUN[kind], rid)
    return _json(_public(kind, stored), status=201)


async def _put(request: web.Request) -> web.Response:
    kind, rid = request.match_info["kind"], _path_id(request)
    doc = await _read_object(request)
    if doc.get("id") is not None and doc["id"] != rid:
        raise invalid_request(f"field `id`: {doc['id']!r} differs from the id in the path ({rid!r})",
                              "invalid_field", "id")
    obj = _validate(kind, doc)
    old = _store(request).get(kind, rid)
    if old is not None:
        obj = _keep_masked_secret(kind, obj, old)
    stored, created = await _write(request, kind, rid, obj)
    log.info("admin: %s %s %s", "created" if created else "replaced", _NOUN[kind], rid)
    return _json(_public(kind, stored), status=201 if created else 200)


async def _delete(request: web.Request) -> web.Response:
    kind, rid = request.match_info["kind"], _path_id(request)
    try:
        existed = await _store(request).delete(kind, rid)
    except StoreError as e:
        raise _store_failure(e) from None
    if not existed:
        raise _not_found(kind, rid)
    log.info("admin: deleted %s %s", _NOUN[kind], rid)
    return _json({"id": rid, "deleted": True})


# -- helpers -----------------------------------------------------------------------------
def _store(request: web.Request):
    return request.app[GATEWAY].store


def _json(body, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _path_id(request: web.Request) -> str:
    rid = request.match_info["id"]
    if not ID_RE.match(rid):
        raise invalid_request("invalid id: use 1-128 letters, digits, `.`, `_` or `-`, starting with a "
                              "letter or digit", "invalid_id", "id")
    return rid


def _not_found(kind: str, rid: str) -> GatewayError:
    return GatewayError(404, f"{_NOUN[kind]} {rid} not found", "not_found_error", "not_found")


async def _read_object(request: web.Request) -> dict:
    raw = await request.read()
    if not raw.strip():
        raise invalid_request("request body is empty: send a JSON object", "invalid_json")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid_request(f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise invalid_request(f"request body must be a JSON object, not {type(doc).__name__}", "invalid_json")
    return doc


def _validate(kind: str, doc: dict) -> dict:
    """Validate strictly (no "5" for 5); returns what the client set, normalised, without ``id``."""
    body = {k: v for k, v in doc.items() if k != "id"}
    try:
        item = SCHEMAS[kind].model_validate(body, strict=True)
    except ValidationError as e:
        message, field = describe_validation_error(e)
        raise invalid_request(message, "invalid_field", field) from None
    return item.model_dump(mode="json", exclude_unset=True, exclude={"id"})


async def _write(request: web.Request, kind: str, rid: str, obj: dict) -> tuple[dict, bool]:
    """Store ``obj`` as ``rid``; returns (the stored object, created?)."""
    store = _store(request)
    try:
        created = await store.put(kind, rid, obj)
    except ConflictError as e:
        raise GatewayError(409, str(e), error_type_for(409), "conflict", param=e.field) from None
    except StoreError as e:
        raise _store_failure(e) from None
    return store.get(kind, rid) or {**obj, "id": rid}, created


def _store_failure(e: StoreError) -> GatewayError:
    log.error("admin: configuration store failed: %s", e)
    if isinstance(e, StoreUnavailable):
        return GatewayError(503, f"configuration store unavailable: {e}", "api_error", "store_unavailable",
                            {"Retry-After": "1"})
    return GatewayError(500, f"configuration store error: {e}", "api_error", "store_error")


def _public(kind: str, obj: dict) -> dict:
    """The object as responses show it: ``id`` first, the provider's ``api_key`` masked."""
    out = {"id": obj.get("id"), **obj}
    pc = out.get("provider_config")
    if kind == "models" and isinstance(pc, dict) and isinstance(pc.get("api_key"), str):
        out["provider_config"] = {**pc, "api_key": mask_secret(pc["api_key"])}
    return out


def _keep_masked_secret(kind: str, new: dict, old: dict) -> dict:
    """A PUT that sends back the masked ``api_key`` it got from a GET keeps the stored key."""
    if kind != "models":
        return new
    new_key = (new.get("provider_config") or {}).get("api_key")
    old_key = (old.get("provider_config") or {}).get("api_key")
    if isinstance(new_key, str) and isinstance(old_key, str) and new_key == mask_secret(old_key):
        return {**new, "provider_config": {**new["provider_config"], "api_key": old_key}}
    return new
