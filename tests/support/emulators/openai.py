"""An OpenAI API emulator: ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/responses``,
whole and streamed.

Follows the public reference: ``Authorization: Bearer`` (401 ``invalid_api_key`` otherwise); the
chat completion and chunk objects (https://platform.openai.com/docs/api-reference/chat), a stream
being a role chunk, ``reasoning_content`` / ``content`` deltas, tool calls (the first chunk of
each with id, type, name and ``arguments: ""``, then argument fragments), the finish chunk, the
usage chunk when ``stream_options.include_usage`` asked, ``data: [DONE]`` (``Reply.interleave``:
the calls' chunks interleaved); legacy
``text_completion`` objects (https://platform.openai.com/docs/api-reference/completions); the
Responses API's ``response`` object and its stream (``event: X\\ndata: {...}`` with
``sequence_number``, https://platform.openai.com/docs/api-reference/responses-streaming); errors
``{"error": {"message", "type", "param", "code"}}``. JSON is compact, as the API sends it.
"""
from __future__ import annotations

import json
import secrets
import time

from aiohttp import web

from tests.support.emulators.base import Emulator, Recorded, Reply, pause, split_json

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
FINISH = {"tool_calls": "tool_calls"}


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def data(obj) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class OpenAIEmulator(Emulator):
    prefix = "/v1"
    model = "gpt-4o-2024-08-06"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)

    def headers(self, extra: dict | None = None) -> dict:
        return {"x-request-id": _id("req_"), "openai-processing-ms": "12", **(extra or {})}

    def error(self, status: int, etype: str | None, message: str, extra: dict | None = None,
              code: str | None = None) -> web.Response:
        doc = {"error": {"message": message, "type": etype or ERROR_TYPES.get(status, "server_error"),
                         "param": None, "code": code}}
        return web.Response(status=status, text=dumps(doc), content_type="application/json",
                            headers=self.headers(extra))

    def usage_for(self, r: Reply, rec: Recorded) -> dict:
        out_chars = sum(map(len, r.text)) + sum(map(len, r.thinking)) + sum(len(dumps(a)) for _, a in r.tool_calls)
        p, c = max(1, len(rec.raw) // 16), max(1, out_chars // 4)
        u = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
             "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
        u.update(r.usage)
        if "total_tokens" not in r.usage:
            u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
        return u

    async def _begin(self, request: web.Request) -> tuple[Recorded, Reply, web.Response | None]:
        rec = await self.record(request)
        r = self.next_reply()
        if r.head_delay:
            import asyncio
            await asyncio.sleep(r.head_delay)
        if rec.headers.get("authorization") != f"Bearer {self.api_key}":
            return rec, r, self.error(401, None, "Incorrect API key provided: sk-****.", code="invalid_api_key")
        if not isinstance(rec.json, dict) or "model" not in rec.json:
            return rec, r, self.error(400, None, "you must provide a model parameter")
        if r.error:
            status, etype, message = r.error
            return rec, r, self.error(status, etype, message, r.headers)
        return rec, r, None

    def whole(self, doc: dict, r: Reply) -> web.Response:
        """A 200 JSON answer, recorded in :attr:`sent`."""
        text = dumps(doc)
        self.sent.append(bytearray(text.encode()))
        return web.Response(text=text, content_type="application/json", headers=self.headers(r.headers))

    async def _stream(self, request: web.Request, r: Reply, events: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers=self.headers({"Content-Type": "text/event-stream; charset=utf-8", **r.headers}))
        await resp.prepare(request)
        sent = bytearray()
        self.sent.append(sent)
        for i, ev in enumerate(events):
            if r.drop_after is not None and i >= r.drop_after:
                request.transport.abort()
                return resp
            await pause(r)
            sent.extend(ev)
            await resp.write(ev)
        await resp.write_eof()
        return resp

    # -- chat completions -------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        rec, r, err = await self._begin(request)
        if err is not None:
            return err
        body = rec.json
        model = r.model or self.model
        usage = self.usage_for(r, rec)
        self.sent_usage.append(usage)
        finish = r.stop or ("tool_calls" if r.tool_calls else "stop")
        calls = [(_id("call_"), name, dumps(args)) for name, args in r.tool_calls]
        cid, created = _id("chatcmpl-"), int(time.time())
        if not body.get("stream"):
            msg = {"role": "assistant", "content": "".join(r.text) if r.text else None, "refusal": None}
            if r.thinking:
                msg["reasoning_content"] = "".join(r.thinking)
            if calls:
                msg["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                     for i, n, a in calls]
            doc = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                   "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
                   "usage": usage, "system_fingerprint": "fp_emu"}
            return self.whole(doc, r)
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_emu"}

        def chunk(delta: dict, finish_reason=None) -> bytes:
            return data({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}]})

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"reasoning_content": t}) for t in r.thinking]
        opening = [chunk({"tool_calls": [{"index": k, "id": call_id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})
                   for k, (call_id, name, _) in enumerate(calls)]
        frags = [[chunk({"tool_calls": [{"index": k, "function": {"arguments": f}}]})
                  for f in (split_json(args) if args != "{}" else ["{}"])] for k, (_, _, args) in enumerate(calls)]
        if r.interleave:  # every call opens, the text, then the fragments round robin
            events += opening + [chunk({"content": t}) for t in r.text]
            events += [f[j] for j in range(max(map(len, frags), default=0)) for f in frags if j < len(f)]
        else:
            events += [chunk({"content": t}) for t in r.text]
            for k in range(len(calls)):
                events += [opening[k], *frags[k]]
        events.append(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(data({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, r, events)

    # -- legacy completions -----------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        rec, r, err = await self._begin(request)
        if err is not None:
            return err
        body = rec.json
        usage = self.usage_for(r, rec)
        for k in ("prompt_tokens_details", "completion_tokens_details"):
            usage.pop(k, None)
        self.sent_usage.append(usage)
        model = r.model or "gpt-3.5-turbo-instruct"
        base = {"id": _id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model}
        finish = r.stop or "stop"
        if not body.get("stream"):
            doc = {**base, "choices": [{"text": "".join(r.text), "index": 0, "logprobs": None, "finish_reason": finish}],
                   "usage": usage}
            return self.whole(doc, r)
        events = [data({**base, "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": None}]})
                  for t in r.text]
        events.append(data({**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": finish}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(data({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, r, events)

    # -- responses --------------------------------------------------------------------------------
    async def responses(self, request: web.Request) -> web.StreamResponse:
        rec, r, err = await self._begin(request)
        if err is not None:
            return err
        body = rec.json
        u = self.usage_for(r, rec)
        usage = {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}
        self.sent_usage.append(usage)
        model = r.model or self.model
        items = []  # (final item, [stream events of it] as (type, fields) pairs)
        if r.thinking:
            iid = _id("rs_")
            items.append(({"id": iid, "type": "reasoning", "summary": [{"type": "summary_text",
                                                                         "text": "".join(r.thinking)}]},
                          [("response.reasoning_summary_text.delta", {"item_id": iid, "summary_index": 0, "delta": t})
                           for t in r.thinking]))
        if r.text:
            iid = _id("msg_")
            items.append(({"id": iid, "type": "message", "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                                        "text": "".join(r.text)}]},
                          [("response.output_text.delta", {"item_id": iid, "content_index": 0, "delta": t,
                                                           "logprobs": []}) for t in r.text]))
        for name, args in r.tool_calls:
            iid, a = _id("fc_"), dumps(args)
            items.append(({"id": iid, "type": "function_call", "status": "completed", "arguments": a,
                           "call_id": _id("call_"), "name": name},
                          [("response.function_call_arguments.delta", {"item_id": iid, "delta": f})
                           for f in split_json(a)]))
        resp = {"id": _id("resp_"), "object": "response", "created_at": int(time.time()), "status": "completed",
                "background": False, "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "model": model, "output": [it for it, _ in items], "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
                "store": body.get("store", True), "temperature": 1.0, "text": {"format": {"type": "text"}},
                "tool_choice": "auto", "tools": body.get("tools", []), "top_p": 1.0, "truncation": "disabled",
                "usage": usage, "user": None, "metadata": {}}
        if not body.get("stream"):
            return self.whole(resp, r)
        seq = iter(range(10**6))

        def ev(kind: str, **fields) -> bytes:
            return f"event: {kind}\ndata: {dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n".encode()

        pending = {**resp, "status": "in_progress", "output": [], "usage": None}
        events = [ev("response.created", response=pending), ev("response.in_progress", response=pending)]
        for index, (item, deltas) in enumerate(items):
            start = {**item, "status": "in_progress"} if "status" in item else {**item, "summary": []}
            if item["type"] == "message":
                start["content"] = []
            if item["type"] == "function_call":
                start["arguments"] = ""
            events.append(ev("response.output_item.added", output_index=index, item=start))
            if item["type"] == "message":
                events.append(ev("response.content_part.added", item_id=item["id"], output_index=index,
                                 content_index=0, part={"type": "output_text", "annotations": [], "logprobs": [],
                                                        "text": ""}))
            for kind, fields in deltas:
                events.append(ev(kind, output_index=index, **fields))
            if item["type"] == "message":
                part = item["content"][0]
                events.append(ev("response.output_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=part["text"], logprobs=[]))
                events.append(ev("response.content_part.done", item_id=item["id"], output_index=index,
                                 content_index=0, part=part))
            elif item["type"] == "function_call":
                events.append(ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 arguments=item["arguments"]))
            events.append(ev("response.output_item.done", output_index=index, item=item))
        if r.error_after is not None:
            events = events[:2 + r.error_after] + [ev("error", code="server_error", message="The server had an error",
                                                      param=None)]
        else:
            events.append(ev("response.completed", response=resp))
        return await self._stream(request, r, events)
