"""The Admin API's OpenAPI 3.1 document, generated from the pydantic resource schemas, with the
proxy's entry routes (``/v1/messages``, ``/v1/responses``, ``/v1/completions``: :mod:`aisix.admin.openapi_entry`).

OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what pydantic emits, so the
resource schemas go in as they are (``components.schemas``), referenced by the paths. An API
key's schema is the shape the API reads and writes (:class:`~aisix.config.resources.ApiKeyWrite`:
``key`` write-only, ``key_prefix`` read-only); its stored hash never appears.
"""
from __future__ import annotations

from functools import lru_cache

from pydantic.json_schema import models_json_schema

from aisix import __version__
from aisix.admin.openapi_entry import ANTHROPIC_ERROR, SECURITY_SCHEMES, entry_paths
from aisix.config.resources import ApiKeyWrite, Model

ADMIN_PREFIX = "/aisix/admin"
_REF = "#/components/schemas/{model}"
_KINDS = {"models": ("Model", "model"), "apikeys": ("ApiKey", "API key")}

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}},
    "description": "OpenAI-style error envelope",
}
_DELETED = {"type": "object", "required": ["id", "deleted"],
            "properties": {"id": {"type": "string"}, "deleted": {"type": "boolean", "const": True}}}


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    text = {400: "Invalid JSON body, or a field failed validation (the message names it)",
            401: "Missing or wrong admin key", 404: "No resource with this id",
            409: "The name (model) or key (API key) is already taken", 503: "The configuration store is unreachable"}
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


def _paths(kind: str, schema: str, noun: str) -> dict:
    item_id = {"name": "id", "in": "path", "required": True, "description": f"The {noun}'s id",
               "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}}
    body = {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}
    create = {"required": True, "content": {"application/json": {"schema": _ref(f"{schema}Create")}}}
    tag = [kind]
    return {
        f"{ADMIN_PREFIX}/{kind}": {
            "get": {"operationId": f"list_{kind}", "tags": tag, "summary": f"List {noun}s",
                    "responses": {"200": _json(_ref(f"{schema}List"), f"Every {noun}"), **_errors(401)}},
            "post": {"operationId": f"create_{kind}", "tags": tag, "summary": f"Create {'an' if noun[0] in 'AEIOU' else 'a'} {noun} (id assigned)",
                     "requestBody": create,
                     "responses": {"201": _json(_ref(schema), f"The stored {noun} with its new id"),
                                   **_errors(400, 401, 409, 503)}},
        },
        f"{ADMIN_PREFIX}/{kind}/{{id}}": {
            "parameters": [item_id],
            "get": {"operationId": f"get_{kind}", "tags": tag, "summary": f"Get one {noun}",
                    "responses": {"200": _json(_ref(schema), f"The {noun}"), **_errors(401, 404)}},
            "put": {"operationId": f"put_{kind}", "tags": tag, "summary": f"Create or replace the {noun} with this id",
                    "requestBody": body,
                    "responses": {"200": _json(_ref(schema), f"Replaced: the stored {noun}"),
                                  "201": _json(_ref(schema), f"Created: the stored {noun}"),
                                  **_errors(400, 401, 409, 503)}},
            "delete": {"operationId": f"delete_{kind}", "tags": tag, "summary": f"Delete a {noun}",
                       "responses": {"200": _json(_ref("Deleted"), "Deleted"), **_errors(401, 404, 503)}},
        },
    }


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    """The whole Admin API as an OpenAPI 3.1 document (a dict, built once)."""
    _, top = models_json_schema([(Model, "validation"), (ApiKeyWrite, "validation")], ref_template=_REF)
    schemas = dict(top.get("$defs", {}))
    schemas["ApiKey"] = {**schemas.pop("ApiKeyWrite"), "title": "ApiKey"}
    schemas["Error"] = _ERROR
    schemas["Deleted"] = _DELETED
    schemas["AnthropicError"] = ANTHROPIC_ERROR
    schemas["ModelCreate"] = _ref("Model")
    schemas["ApiKeyCreate"] = _ref("ApiKey")  # without `key`, one is generated (returned in the 201)
    for schema, _noun in _KINDS.values():
        schemas[f"{schema}List"] = {"type": "object", "required": ["total", "list"],
                                    "properties": {"total": {"type": "integer", "minimum": 0},
                                                   "list": {"type": "array", "items": _ref(schema)}}}
    paths: dict = {}
    for kind, (schema, noun) in _KINDS.items():
        paths.update(_paths(kind, schema, noun))
    schemas["DeploymentHealth"] = {
        "type": "object", "required": ["model", "deployment", "upstream", "state", "cooldown_remaining_ms", "in_flight",
                                       "ewma_first_byte_ms", "recent_failures"],
        "properties": {"model": {"type": "string"}, "deployment": {"type": "string"}, "upstream": {"type": "string"},
                       "state": {"enum": ["healthy", "cooling_down"]},
                       "cooldown_remaining_ms": {"type": "integer", "minimum": 0},
                       "in_flight": {"type": "integer", "minimum": 0},
                       "ewma_first_byte_ms": {"type": ["number", "null"]},
                       "recent_failures": {"type": "integer", "minimum": 0}}}
    paths["/aisix/admin/health/models"] = {"get": {
        "operationId": "healthModels", "summary": "Each deployment's routing state, as this process sees it",
        "responses": {"200": _json({"type": "object", "required": ["total", "list"], "properties": {
            "total": {"type": "integer", "minimum": 0},
            "list": {"type": "array", "items": _ref("DeploymentHealth")}}}, "Every deployment of every model"),
            **_errors(401)}}}
    paths.update(entry_paths(_REF.format(model="Error")))  # on the proxy listener (their own `servers`)
    paths["/openapi"] = {"get": {"operationId": "openapi", "summary": "This document", "security": [],
                                 "responses": {"200": {"description": "OpenAPI 3.1 document",
                                                       "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "aisix Admin API", "version": __version__,
                 "description": "Models and API keys of the aisix gateway. `provider_config.api_key` is "
                                "write-only: responses show it masked (`****` + its last 4 characters); "
                                "a PUT that sends the masked value back keeps the stored key while "
                                "`api_base` names the same host (scheme, host, port); another host needs "
                                "the key again (400). An API key's `key` is stored only as its SHA-256: "
                                "it is in the response to the write that set it (generated when a "
                                "create leaves it out) and nowhere else; a replace without it keeps the "
                                "stored key; list and get show `key_prefix`. `expires_at` (RFC 3339) and "
                                "`disabled` end a key's use (401 `expired_api_key` / `disabled_api_key`)."},
        "servers": [{"url": "/"}],
        "security": [{"adminKey": []}],
        "tags": [{"name": "models"}, {"name": "apikeys"},
                 {"name": "proxy", "description": "client API routes besides chat completions, on the proxy listener"}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer",
                                                        "description": "an entry of deployment.admin.admin_key"},
                                           **SECURITY_SCHEMES}},
    }
