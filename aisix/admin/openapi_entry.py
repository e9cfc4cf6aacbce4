"""The entry routes in the OpenAPI document (``GET /openapi``): what each takes, passes through,
translates and refuses. They are served on the proxy listener (``server.proxy.listen``), not the
Admin API's: each path says so in its own ``servers``. The request and answer bodies are the
upstream APIs' own, referenced, not restated: Anthropic's Messages API
(https://docs.anthropic.com/en/api/messages) and OpenAI's Responses and completions APIs.
"""
from __future__ import annotations

PROXY_SERVER = [{"url": "/", "description": "the proxy listener (server.proxy.listen), not the Admin API's"}]

ANTHROPIC_ERROR = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
    "description": "Anthropic's error envelope (https://docs.anthropic.com/en/api/errors)",
}
_OBJECT = {"type": "object"}
_KEYS = [{"clientKey": []}, {"anthropicKey": []}]


def _answers(error_ref: str, stream: bool) -> dict:
    ok = {"application/json": {"schema": _OBJECT}}
    if stream:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    err = {"content": {"application/json": {"schema": {"$ref": error_ref}}}}
    return {"200": {"description": "The API's answer (an event stream when `stream` is true)", "content": ok},
            **{str(s): {"description": d, **err} for s, d in (
                (400, "Invalid request, or a feature this provider can't serve (the message names it)"),
                (401, "Missing or unknown client key"), (403, "The key may not use this model"),
                (429, "Rate limited (Retry-After)"), (502, "The upstream failed"), (504, "The upstream timed out"))}}


def _post(op: str, summary: str, description: str, required: list[str], error_ref: str,
          stream: bool = True) -> dict:
    body = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": {"model": {
            "type": "string", "description": "a model alias the key may use"}}}}}}
    return {"servers": PROXY_SERVER, "post": {
        "operationId": op, "tags": ["proxy"], "summary": summary, "description": description, "security": _KEYS,
        "requestBody": body, "responses": _answers(error_ref, stream)}}


def entry_paths(error_ref: str) -> dict:
    """The entry routes' path items; ``error_ref`` is the OpenAI error envelope's ``$ref``
    (Anthropic's is ``#/components/schemas/AnthropicError``, see :data:`ANTHROPIC_ERROR`)."""
    anthropic_ref = "#/components/schemas/AnthropicError"
    return {
        "/v1/messages": _post(
            "create_message", "Anthropic Messages API",
            "To an `anthropic` model: passed through (the body as sent, only `model` rewritten; "
            "`anthropic-version`/`anthropic-beta` forwarded; the answer and its SSE events as the upstream sent "
            "them). To other providers: translated to chat completions and back, streamed as the Messages events "
            "(message_start, content_block_start/delta/stop for text, thinking, tool_use, message_delta, "
            "message_stop). Refused (400): document blocks, server tools, mcp_servers, container. Errors in "
            "Anthropic's envelope.", ["model", "max_tokens", "messages"], anthropic_ref),
        "/v1/messages/count_tokens": _post(
            "count_message_tokens", "Anthropic token count",
            "`{\"input_tokens\": n}`: Anthropic's count for an `anthropic` model, else an estimate "
            "(`\"estimated\": true`, header `x-aisix-token-count: estimated`). Counted by the key's and the "
            "model's rate limits like any call (a request, a concurrency slot; 0 tokens).", ["model", "messages"],
            anthropic_ref, stream=False),
        "/v1/responses": _post(
            "create_response", "OpenAI Responses API",
            "To an `openai` model: passed through (every feature, stored state included). To other providers "
            "the stateless subset is translated to chat completions and back, streamed as the Responses events "
            "(response.created, response.output_item.added, response.output_text.delta, "
            "response.function_call_arguments.delta, ..., response.completed). Refused (400 "
            "`unsupported_parameter`, naming it): previous_response_id, conversation, store: true, background, "
            "prompt, item_reference, built-in tools, file inputs.", ["model"], error_ref),
        "/v1/completions": _post(
            "create_completion", "OpenAI legacy completions",
            "Passed through to `openai`, `deepseek` and `mock` models; other providers have no such API "
            "(400 `unsupported_operation`).", ["model", "prompt"], error_ref),
    }


SECURITY_SCHEMES = {
    "clientKey": {"type": "http", "scheme": "bearer", "description": "a client key (apikeys[].key)"},
    "anthropicKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                     "description": "a client key, as the anthropic SDK sends it"},
}
