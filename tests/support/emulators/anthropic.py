"""An Anthropic Messages API emulator: ``POST /v1/messages``, whole and streamed.

Follows the public reference: request headers ``x-api-key`` and ``anthropic-version``
(https://docs.anthropic.com/en/api/versioning), the Message object
(https://docs.anthropic.com/en/api/messages), the stream's events in their order with
``event: X\\ndata: {json}\\n\\n`` framing (https://docs.anthropic.com/en/docs/build-with-claude/streaming):
``message_start``, then per content block ``content_block_start``/``content_block_delta``…/
``content_block_stop`` (a ``ping`` after the first block starts; a tool block's first
``input_json_delta`` is empty, and the only one for a tool called without parameters), ``message_delta`` (stop reason, cumulative usage), ``message_stop``;
and errors ``{"type":"error","error":{"type","message"},"request_id"}`` with ``request-id``,
``retry-after`` (429) and ``x-should-retry`` headers (https://docs.anthropic.com/en/api/errors).
JSON is compact, as the API sends it, except ``ping``'s ``{"type": "ping"}``.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import uuid

from aiohttp import web

from tests.support.emulators.base import Emulator, Recorded, Reply, pause, split_json

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def event(name: str, obj) -> bytes:
    data = '{"type": "ping"}' if name == "ping" else dumps(obj)
    return f"event: {name}\ndata: {data}\n\n".encode()


def _id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18).replace("-", "A").replace("_", "b")[:24]


class AnthropicEmulator(Emulator):
    prefix = "/v1"
    model = "claude-sonnet-4-5-20250929"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    def headers(self, extra: dict | None = None) -> dict:
        return {"request-id": _id("req_"), "anthropic-organization-id": str(uuid.UUID(int=7)), **(extra or {})}

    def error(self, status: int, etype: str | None, message: str, extra: dict | None = None) -> web.Response:
        doc = {"type": "error", "error": {"type": etype or ERROR_TYPES.get(status, "api_error"), "message": message},
               "request_id": _id("req_")}
        hdrs = self.headers(extra)
        hdrs.setdefault("x-should-retry", "true" if status == 429 or status >= 500 else "false")
        return web.Response(status=status, text=dumps(doc), content_type="application/json", headers=hdrs)

    def usage_for(self, r: Reply, rec: Recorded) -> dict:
        out_chars = sum(map(len, r.text)) + sum(map(len, r.thinking)) + sum(len(dumps(a)) for _, a in r.tool_calls)
        u = {"input_tokens": max(1, len(rec.raw) // 16), "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0, "output_tokens": max(1, out_chars // 4)}
        u.update(r.usage)
        return u

    async def count_tokens(self, request: web.Request) -> web.Response:
        """``POST /v1/messages/count_tokens`` (https://docs.anthropic.com/en/api/messages-count-tokens):
        ``{"input_tokens": n}``, n = the body's length / 16 (what :meth:`usage_for` counts too)."""
        rec = await self.record(request)
        refused = self.refused(rec, ("model", "messages"))
        if refused is not None:
            return refused
        return web.Response(text=dumps({"input_tokens": max(1, len(rec.raw) // 16)}), content_type="application/json",
                            headers=self.headers())

    def refused(self, rec: Recorded, required: tuple[str, ...]) -> web.Response | None:
        """The API's answer to a request without its key, version or required fields (None: none)."""
        key = rec.headers.get("x-api-key")
        if key is None:
            return self.error(401, None, "x-api-key header is required")
        if key != self.api_key:
            return self.error(401, None, "invalid x-api-key")
        if "anthropic-version" not in rec.headers:
            return self.error(400, None, "anthropic-version: header is required")
        if not isinstance(rec.json, dict):
            return self.error(400, None, "There was an error parsing the body of your request.")
        for f in required:
            if f not in rec.json:
                return self.error(400, None, f"{f}: Field required")
        return None

    async def messages(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        r = self.next_reply()
        if r.head_delay:
            await asyncio.sleep(r.head_delay)
        refused = self.refused(rec, ("model", "max_tokens", "messages"))
        if refused is not None:
            return refused
        body = rec.json
        if r.error:
            status, etype, message = r.error
            return self.error(status, etype, message, r.headers)
        # an alias answers with the dated snapshot it points at, as the API does
        model = r.model or (self.model if self.model.startswith(body["model"]) else body["model"])
        usage = self.usage_for(r, rec)
        self.sent_usage.append(usage)
        stop = r.stop or ("tool_use" if r.tool_calls else "end_turn")
        if body.get("stream"):
            return await self.stream(request, r, model, usage, stop)
        content = []
        if r.thinking:
            content.append({"type": "thinking", "thinking": "".join(r.thinking), "signature": "EqQBCkYIBxgC"})
        if r.text:
            content.append({"type": "text", "text": "".join(r.text)})
        for name, args in r.tool_calls:
            content.append({"type": "tool_use", "id": _id("toolu_"), "name": name, "input": args})
        doc = {"model": model, "id": _id("msg_"), "type": "message", "role": "assistant", "content": content,
               "stop_reason": stop, "stop_sequence": None,
               "usage": {**usage, "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                         "service_tier": "standard"}}
        self.sent.append(bytearray(dumps(doc).encode()))
        return web.Response(text=dumps(doc), content_type="application/json", headers=self.headers(r.headers))

    async def stream(self, request: web.Request, r: Reply, model: str, usage: dict, stop: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers=self.headers({"Content-Type": "text/event-stream; charset=utf-8",
                                                        "Cache-Control": "no-cache", **r.headers}))
        await resp.prepare(request)
        wire = bytearray()
        self.sent.append(wire)

        async def write(data: bytes) -> None:
            wire.extend(data)
            await resp.write(data)

        start_usage = {**usage, "output_tokens": min(usage["output_tokens"], 1)}
        start = {"model": model, "id": _id("msg_"), "type": "message", "role": "assistant", "content": [],
                 "stop_reason": None, "stop_sequence": None,
                 "usage": {**start_usage, "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                             "ephemeral_1h_input_tokens": 0},
                           "service_tier": "standard"}}
        await write(event("message_start", {"type": "message_start", "message": start}))
        blocks: list[tuple[dict, list[dict]]] = []
        if r.thinking:
            deltas = [{"type": "thinking_delta", "thinking": t} for t in r.thinking]
            blocks.append(({"type": "thinking", "thinking": "", "signature": ""},
                           deltas + [{"type": "signature_delta", "signature": "EqQBCkYIBxgC"}]))
        if r.text:
            blocks.append(({"type": "text", "text": ""}, [{"type": "text_delta", "text": t} for t in r.text]))
        for name, args in r.tool_calls:
            frags = [""] + (split_json(dumps(args)) if args else [])  # no parameters: the empty fragment only
            blocks.append(({"type": "tool_use", "id": _id("toolu_"), "name": name, "input": {}},
                           [{"type": "input_json_delta", "partial_json": f} for f in frags]))
        sent = 0
        for index, (block, deltas) in enumerate(blocks):
            await pause(r)
            await write(event("content_block_start",
                                   {"type": "content_block_start", "index": index, "content_block": block}))
            if index == 0:
                await write(event("ping", None))
            for d in deltas:
                if r.error_after is not None and sent >= r.error_after:
                    await write(event("error", {"type": "error", "error": {
                        "type": "overloaded_error", "message": "Overloaded"}}))
                    await resp.write_eof()
                    return resp
                if r.drop_after is not None and sent >= r.drop_after:
                    request.transport.abort()
                    return resp
                await pause(r)
                await write(event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                               "delta": d}))
                sent += 1
            await write(event("content_block_stop", {"type": "content_block_stop", "index": index}))
        await pause(r)
        await write(event("message_delta", {"type": "message_delta",
                                                 "delta": {"stop_reason": stop, "stop_sequence": None},
                                                 "usage": usage}))
        await write(event("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp
