"""The Admin API (control plane): create, list, get, upsert and delete models and API keys.

Routes, under ``/aisix/admin`` (``{kind}`` is ``models`` or ``apikeys``)::

    POST   /aisix/admin/{kind}        201 the stored object with its new id
    GET    /aisix/admin/{kind}        200 {"total": n, "list": [...]}
    GET    /aisix/admin/{kind}/{id}   200 the object | 404
    PUT    /aisix/admin/{kind}/{id}   201 created | 200 replaced
    DELETE /aisix/admin/{kind}/{id}   200 {"id", "deleted": true} | 404
    GET    /aisix/admin/health/models 200 {"total": n, "list": [each deployment's routing state]}
    GET    /openapi                   the OpenAPI 3.1 document (no auth: it holds no data)

Every other path needs ``Authorization: Bearer <admin key>`` (``deployment.admin.admin_key``,
compared in constant time), else 401. Bodies are validated strictly against the pydantic
schemas in :mod:`aisix.config.resources`; errors use the OpenAI envelope and name the field:
bad JSON or a bad field → 400, name/key taken → 409, unknown id → 404, store down → 503.

Secrets: ``provider_config.api_key`` is never logged and responses show it masked
(:func:`~aisix.config.resources.mask_secret`), and so are credentials in ``api_base`` (``****@``). A
PUT that sends back a masked value keeps the stored one, so a GET → edit → PUT round trip is
safe; the masked ``api_key`` is kept only while the upstream's origin (scheme, host, port of the
``api_base`` in effect) stays the same, else the PUT is a 400 asking for the key again, so a
stored key never follows a request to another host. Client API keys are stored as their
SHA-256 (:class:`~aisix.config.resources.ApiKey`): the secret ``key`` is in the response to the write
that set it and nowhere else; list and get show ``key_prefix``. A create without ``key``
generates one (``sk-`` and 32 random URL-safe characters); a replace without ``key`` keeps the
stored one.
"""
from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

import orjson
from aiohttp import web
from pydantic import ValidationError

from aisix.admin.openapi import ADMIN_PREFIX, openapi_document
from aisix.config.resources import (
    WRITE_SCHEMAS,
    describe_validation_error,
    fallback_problems,
    mask_secret,
    mask_url_userinfo,
    new_client_key,
    url_origin,
)
from aisix.config.store import ConflictError, StoreError, StoreUnavailable
from aisix.errors import GatewayError, error_type_for, invalid_request
from aisix.gateway import GATEWAY
from aisix.providers import get_provider
from aisix.proxy.handlers import MAX_JSON_DEPTH, json_too_deep

log = logging.getLogger("aisix.admin")

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KIND = "{kind:models|apikeys}"
_NOUN = {"models": "model", "apikeys": "API key"}
_ADMIN_KEYS = web.AppKey("admin_keys", tuple)
_MAX_BODY = 1024 * 1024


def create_admin_app(gateway) -> web.Application:
    """The Admin API as an aiohttp app; the server mounts it on ``server.admin.listen`` behind the
    measuring middleware (:func:`aisix.server.app.create_admin_app_measured`), which answers every
    failure in the OpenAI error envelope."""
    app = web.Application(middlewares=[_auth], client_max_size=_MAX_BODY)
    app[GATEWAY] = gateway
    app[_ADMIN_KEYS] = tuple(k.key.encode() for k in gateway.config.deployment.admin.admin_key)
    app.router.add_get("/openapi", _openapi)
    app.router.add_get(f"{ADMIN_PREFIX}/{_KIND}", _list)
    app.router.add_post(f"{ADMIN_PREFIX}/{_KIND}", _create)
    app.router.add_get(f"{ADMIN_PREFIX}/{_KIND}/{{id}}", _get)
    app.router.add_put(f"{ADMIN_PREFIX}/{_KIND}/{{id}}", _put)
    app.router.add_delete(f"{ADMIN_PREFIX}/{_KIND}/{{id}}", _delete)
    app.router.add_get(f"{ADMIN_PREFIX}/health/models", _health_models)
    return app


# -- middlewares -------------------------------------------------------------------
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


async def _health_models(request: web.Request) -> web.Response:
    """``GET /aisix/admin/health/models``: each deployment of each model as this process's router
    sees it: ``state`` (healthy / cooling_down), ``cooldown_remaining_ms``, ``in_flight``,
    ``ewma_first_byte_ms``, ``recent_failures`` (:meth:`~aisix.proxy.routing.Router.health`). With
    ``--workers N`` it is worker 0's view (the Admin API's process)."""
    gw = request.app[GATEWAY]
    models = sorted(gw.holder.current.models.values(), key=lambda m: m.name)
    items = gw.router.health(models, time.monotonic())
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
    obj, secret = _to_store(kind, doc, None, _other_models(request, None))
    rid = str(uuid.uuid4())
    stored, _ = await _write(request, kind, rid, obj)
    log.info("admin: created %s %s", _NOUN[kind], rid)
    return _json(_public(kind, stored, secret), status=201)


async def _put(request: web.Request) -> web.Response:
    kind, rid = request.match_info["kind"], _path_id(request)
    doc = await _read_object(request)
    if doc.get("id") is not None and doc["id"] != rid:
        raise invalid_request(f"field `id`: {doc['id']!r} differs from the id in the path ({rid!r})",
                              "invalid_field", "id")
    old = _store(request).get(kind, rid)
    obj, secret = _to_store(kind, doc, old, _other_models(request, rid))
    stored, created = await _write(request, kind, rid, obj)
    log.info("admin: %s %s %s", "created" if created else "replaced", _NOUN[kind], rid)
    return _json(_public(kind, stored, secret), status=201 if created else 200)


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
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_too_deep(doc):
        raise invalid_request(f"request body is nested over {MAX_JSON_DEPTH} levels deep", "invalid_json")
    return doc


def _validate(kind: str, doc: dict):
    """Validate strictly (no "5" for 5) against the kind's write schema; returns the pydantic object."""
    body = {k: v for k, v in doc.items() if k != "id"}
    try:
        return WRITE_SCHEMAS[kind].model_validate(body, strict=True)
    except ValidationError as e:
        message, field = describe_validation_error(e)
        raise invalid_request(message, "invalid_field", field) from None


def _other_models(request: web.Request, rid: str | None) -> dict:
    """The configured models by name but the one stored as ``rid`` (None: a create)."""
    return {name: m for name, m in request.app[GATEWAY].holder.current.models.items() if rid is None or m.id != rid}


def _to_store(kind: str, doc: dict, old: dict | None, others: dict) -> tuple[dict, str | None]:
    """The object to store for a write of ``doc`` over ``old`` (None: a create), and the client
    key to show once (set by this write, else None). ``others``: the other models by name.

    Models: what the client set, normalised, without ``id`` (:func:`_keep_masked_secret`); its
    ``fallbacks`` must name other configured models and close no cycle (400 ``invalid_field``,
    ``param`` ``fallbacks.N``: :func:`~aisix.config.resources.fallback_problems`).
    API keys: ``key`` hashed; left out, it is generated on create and kept on replace."""
    item = _validate(kind, doc)
    if kind == "models":
        problems = fallback_problems(item, others)
        if problems:
            raise invalid_request("; ".join(f"field `{where}`: {reason}" for where, reason in problems),
                                  "invalid_field", problems[0][0])
        obj = item.model_dump(mode="json", exclude_unset=True, exclude={"id"})
        obj = obj if old is None else _keep_masked_secret(obj, old)
        _no_masked_placeholder(obj)
        return obj, None
    if item.key is None and old is not None and isinstance(old.get("key_hash"), str):
        return {"key_hash": old["key_hash"], "key_prefix": old.get("key_prefix", ""), **item.settings()}, None
    secret = item.key or new_client_key()
    return item.stored(secret), secret


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


def _public(kind: str, obj: dict, secret: str | None = None) -> dict:
    """The object as responses show it: ``id`` first, the provider's ``api_key`` and credentials
    in ``api_base`` masked; an API key without its ``key_hash``, with ``key`` only when ``secret``
    (just set) is given."""
    if kind == "apikeys":
        shown = {"key": secret} if secret is not None else {}
        return {"id": obj.get("id"), **shown, **{k: v for k, v in obj.items() if k != "key_hash"}}
    out = {"id": obj.get("id"), **obj}
    if isinstance(out.get("provider_config"), dict):
        out["provider_config"] = _masked(out["provider_config"])
    if isinstance(out.get("deployments"), list):
        out["deployments"] = [{**d, "provider_config": _masked(d["provider_config"])}
                              if isinstance(d, dict) and isinstance(d.get("provider_config"), dict) else d
                              for d in out["deployments"]]
    return out


#: ``provider_config`` field names whose values are shown masked, at any depth (with everything
#: under them): ``api_key``, a provider's own secret settings, typos of ``api_key`` (``apikey``,
#: ``api-key``), credentials in nested settings (``headers: {Authorization: ...}``).
_SECRET_FIELD = re.compile(r"key|secret|token(?!s)|passw|credential|auth|bearer|cookie|signature|private",
                           re.IGNORECASE)  # (token, not tokens: max_tokens and the mock's tokens are counts)


def _is_secret(name: object) -> bool:
    return isinstance(name, str) and _SECRET_FIELD.search(name) is not None


def _mask_leaf(value: object) -> object:
    """A secret scalar as shown: a string or a number masked (:func:`mask_secret`), others as they are."""
    if isinstance(value, str):
        return mask_secret(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return mask_secret(str(value))
    return value


def _mask_tree(value: object, secret: bool) -> object:
    """``value`` as shown: under a secret name (``secret``) every scalar masked; dicts and lists walked."""
    if isinstance(value, dict):
        return {k: _mask_tree(v, secret or _is_secret(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_tree(v, secret) for v in value]
    return _mask_leaf(value) if secret else value


def _masked(pc: dict) -> dict:
    """A ``provider_config`` as responses show it: every value under a name that says it is a
    secret (:data:`_SECRET_FIELD`, at any depth) masked, and credentials in ``api_base`` masked."""
    pc = {name: _mask_tree(value, _is_secret(name)) for name, value in pc.items()}
    if isinstance(pc.get("api_base"), str):
        pc["api_base"] = mask_url_userinfo(pc["api_base"])
    return pc


def _keep_masked_secret(new: dict, old: dict) -> dict:
    """A PUT (``new`` over the stored ``old`` model) that sends back masked values it got from a
    GET keeps the stored ones, for the model's ``provider_config`` and for each deployment's (matched
    by ``id``): an ``api_base`` equal to the stored one masked (:func:`~aisix.config.resources.mask_url_userinfo`)
    keeps the stored URL; an ``api_key`` (or any value under a secret name, :data:`_SECRET_FIELD`) equal to
    the stored one masked keeps the stored secret only while the upstream origin (:func:`_origin`)
    is unchanged. Raises 400 ``invalid_field`` otherwise."""
    out = dict(new)
    if isinstance(new.get("provider_config"), dict) or isinstance(old.get("provider_config"), dict):
        out["provider_config"] = _keep_in(new.get("model"), new.get("provider_config"), old.get("model"),
                                          old.get("provider_config"), "provider_config")
    olds = {d.get("id"): d for d in old.get("deployments") or () if isinstance(d, dict)}
    if isinstance(new.get("deployments"), list):
        out["deployments"] = [
            {**d, "provider_config": _keep_in(d.get("model"), d.get("provider_config"), olds[d["id"]].get("model"),
                                              olds[d["id"]].get("provider_config"), f"deployments.{i}.provider_config")}
            if isinstance(d, dict) and d.get("id") in olds else d for i, d in enumerate(new["deployments"])]
    return out


def _no_masked_placeholder(obj: dict) -> None:
    """A masked value a GET showed (``****…`` under a secret name, ``****@`` in a URL) that no stored
    secret backs (a renamed deployment, a changed shape) must never be stored as the secret: 400 asking for it."""
    configs = [("provider_config", obj.get("provider_config"))] + [
        (f"deployments.{i}.provider_config", d.get("provider_config"))
        for i, d in enumerate(obj.get("deployments") or ()) if isinstance(d, dict)]
    for where, pc in configs:
        if not isinstance(pc, dict):
            continue
        for path, value in _secret_leaves(pc, False, where):
            if isinstance(value, str) and value.startswith("****"):
                raise invalid_request(f"field `{path}`: a masked secret matches no stored one here (a new "
                                      "deployment id or shape); send the secret itself", "invalid_field", path)
        if isinstance(pc.get("api_base"), str) and "://****@" in pc["api_base"]:
            raise invalid_request(f"field `{where}.api_base`: masked credentials match no stored ones here; "
                                  "send the URL itself", "invalid_field", f"{where}.api_base")


def _secret_leaves(value: object, secret: bool, path: str):
    """``(path, scalar)`` of every scalar under a secret name in ``value``."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _secret_leaves(v, secret or _is_secret(k), f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _secret_leaves(v, secret, f"{path}.{i}")
    elif secret:
        yield path, value


def _restore(new: object, old: object, secret: bool, path: str, restored: list[str]) -> object:
    """``new`` with each masked scalar under a secret name put back to the ``old`` value at the same
    path whose mask it is; the paths put back are appended to ``restored``."""
    if isinstance(new, dict):
        old = old if isinstance(old, dict) else {}
        return {k: _restore(v, old.get(k), secret or _is_secret(k), f"{path}.{k}", restored) for k, v in new.items()}
    if isinstance(new, list):
        old = old if isinstance(old, list) else []
        return [_restore(v, old[i] if i < len(old) else None, secret, f"{path}.{i}", restored)
                for i, v in enumerate(new)]
    if secret and isinstance(new, str) and old is not None and not isinstance(old, (dict, list)) \
            and new != old and new == _mask_leaf(old):
        restored.append(path)
        return old
    return new


def _keep_in(model, pc, old_model, old_pc, where: str) -> dict:
    pc, old_pc = dict(pc if isinstance(pc, dict) else {}), old_pc if isinstance(old_pc, dict) else {}
    base, old_base = pc.get("api_base"), old_pc.get("api_base")
    if isinstance(base, str) and isinstance(old_base, str) and base != old_base and base == mask_url_userinfo(old_base):
        pc["api_base"] = old_base
    restored: list[str] = []
    pc = {name: _restore(value, old_pc.get(name), _is_secret(name), f"{where}.{name}", restored)
          for name, value in pc.items()}
    if restored:
        origin = _origin(model, pc) if isinstance(model, str) else None
        if origin is None or origin != _origin(old_model, old_pc):
            raise invalid_request(
                f"field `{restored[0]}`: the masked secret is kept only while the upstream stays the "
                "same (scheme, host and port of `api_base`); this change sends requests elsewhere, so send "
                "the key again", "invalid_field", restored[0])
    return pc


def _origin(model: object, pc: dict) -> tuple | None:
    """The origin a model's requests go to: its ``api_base``, or its provider's default; None when
    it cannot be told (an unreadable stored value), which matches nothing."""
    try:
        base = pc.get("api_base") or get_provider(str(model).partition("/")[0]).default_api_base
        return url_origin(base)
    except (KeyError, ValueError):
        return None
