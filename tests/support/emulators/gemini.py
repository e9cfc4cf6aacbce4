"""A Gemini API emulator: ``POST /v1beta/models/{model}:generateContent``,
``:streamGenerateContent`` (``?alt=sse``, else a JSON array) and ``:batchEmbedContents``.

Follows the public reference (https://ai.google.dev/api/generate-content,
https://ai.google.dev/api/embeddings): ``x-goog-api-key`` (or ``?key=``); a
``GenerateContentResponse`` of ``candidates`` (``content.parts``, ``role: "model"``,
``finishReason``, ``index``), ``usageMetadata`` (``promptTokenCount``, ``candidatesTokenCount``,
``totalTokenCount``, ``promptTokensDetails``, ``thoughtsTokenCount`` when thinking),
``modelVersion``, ``responseId``. Whole bodies are pretty-printed (2-space indent) as Google's
front end sends them; ``alt=sse`` events are ``data: {json}\\r\\n\\r\\n`` with the front end's
``", "``-less separators, every event a whole response carrying the running usage, and no
terminator. Errors: ``{"error": {"code", "message", "status", "details"}}``; a 429 carries a
``google.rpc.RetryInfo`` ``retryDelay``; a missing key is 403 ``PERMISSION_DENIED``, a wrong one
400 ``INVALID_ARGUMENT`` (``API_KEY_INVALID``) (https://ai.google.dev/gemini-api/docs/troubleshooting).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets

from aiohttp import web

from tests.support.emulators.base import Emulator, Recorded, Reply, pause

STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

HEADERS = {"Vary": "Origin, X-Origin, Referer", "Server": "scaffolding on HTTPServer2", "X-XSS-Protection": "0",
           "X-Frame-Options": "SAMEORIGIN", "X-Content-Type-Options": "nosniff"}


def pretty(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ": "), ensure_ascii=False).encode() + b"\r\n\r\n"


def embedding_values(text: str, dims: int) -> list[float]:
    """Deterministic values, each exact in float32 (k/256), so a base64 round trip is exact."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i % len(digest)] - 128) / 256 for i in range(dims)]


class GeminiEmulator(Emulator):
    prefix = "/v1beta"
    model = "gemini-2.5-flash"
    embed_dims = 8

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{target}", self.dispatch)

    def error(self, status: int, gstatus: str | None, message: str, extra: dict | None = None,
              details: list | None = None) -> web.Response:
        err = {"code": status, "message": message, "status": gstatus or STATUS.get(status, "UNKNOWN")}
        if status == 429 and details is None:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]
        if details:
            err["details"] = details
        return web.Response(status=status, text=pretty({"error": err}), content_type="application/json",
                            charset="UTF-8", headers={**HEADERS, **(extra or {})})

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        model, _, method = request.match_info["target"].partition(":")
        r = self.next_reply()
        if r.head_delay:
            await asyncio.sleep(r.head_delay)
        key = rec.headers.get("x-goog-api-key") or rec.query.get("key")
        if key is None:
            return self.error(403, None, "Method doesn't allow unregistered callers (callers without established "
                              "identity). Please use API Key or other form of API consumer identity to call this API.")
        if key != self.api_key:
            return self.error(400, None, "API key not valid. Please pass a valid API key.", details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])
        if not isinstance(rec.json, dict):
            return self.error(400, None, "Invalid JSON payload received.")
        if r.error:
            status, gstatus, message = r.error
            return self.error(status, gstatus, message, r.headers)
        if method == "batchEmbedContents":
            return self.embed(rec, r)
        if method not in ("generateContent", "streamGenerateContent"):
            return self.error(404, None, f"Method {method} not found.")
        if not rec.json.get("contents"):
            return self.error(400, None, "* GenerateContentRequest.contents: contents is not specified\n")
        version = r.model or model
        usage = self.usage_for(r, rec)
        self.sent_usage.append(usage)
        rid = secrets.token_urlsafe(16)[:22]
        if method == "generateContent":
            doc = {"candidates": [{"content": {"parts": self.parts(r, r.text, r.thinking, calls=True), "role": "model"},
                                   "finishReason": self.finish(r), "index": 0}],
                   "usageMetadata": usage, "modelVersion": version, "responseId": rid}
            return web.Response(text=pretty(doc), content_type="application/json", charset="UTF-8",
                                headers={**HEADERS, **r.headers})
        return await self.stream(request, r, version, rid, usage, rec.query.get("alt") == "sse")

    def finish(self, r: Reply) -> str:
        return r.stop or "STOP"

    def parts(self, r: Reply, text: list[str], thinking: list[str], calls: bool) -> list[dict]:
        parts: list[dict] = [{"text": "".join(thinking), "thought": True}] if thinking else []
        if text:
            parts.append({"text": "".join(text)})
        if calls:
            for i, (name, args) in enumerate(r.tool_calls):
                part: dict = {"functionCall": {"name": name, "args": args}}
                if i == 0 and r.signature:
                    part["thoughtSignature"] = r.signature
                parts.append(part)
        return parts

    def usage_for(self, r: Reply, rec: Recorded) -> dict:
        prompt = max(1, len(rec.raw) // 16)
        cand = max(1, (sum(map(len, r.text)) + sum(len(json.dumps(a)) for _, a in r.tool_calls)) // 4)
        thoughts = sum(map(len, r.thinking)) // 4
        u = {"promptTokenCount": prompt, "candidatesTokenCount": cand}
        u.update({k: v for k, v in r.usage.items() if k in ("promptTokenCount", "candidatesTokenCount")})
        thoughts = r.usage.get("thoughtsTokenCount", thoughts)
        total = u["promptTokenCount"] + u["candidatesTokenCount"] + thoughts
        u["totalTokenCount"] = r.usage.get("totalTokenCount", total)
        u["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": u["promptTokenCount"]}]
        if thoughts:
            u["thoughtsTokenCount"] = thoughts
        for k, v in r.usage.items():
            u.setdefault(k, v)
        return u

    async def stream(self, request: web.Request, r: Reply, version: str, rid: str, usage: dict,
                     sse_mode: bool) -> web.StreamResponse:
        # one event per thinking delta, per text delta, and one for all function calls; the last carries
        # finishReason; each carries the usage so far (the final one the whole usage)
        steps: list[tuple[list[str], list[str], bool]] = [([], [t], False) for t in r.thinking]
        steps += [([t], [], False) for t in r.text]
        if r.tool_calls:
            steps.append(([], [], True))
        if not steps:
            steps = [([""], [], False)]
        chunks = []
        for i, (text, thinking, calls) in enumerate(steps):
            last = i == len(steps) - 1
            cand: dict = {"content": {"parts": self.parts(r, text, thinking, calls), "role": "model"}}
            if last:
                cand["finishReason"] = self.finish(r)
            cand["index"] = 0
            running = dict(usage)
            if not last:
                running["candidatesTokenCount"] = max(1, usage["candidatesTokenCount"] * (i + 1) // len(steps))
                running["totalTokenCount"] = (running["promptTokenCount"] + running["candidatesTokenCount"]
                                              + running.get("thoughtsTokenCount", 0))
            chunks.append({"candidates": [cand], "usageMetadata": running, "modelVersion": version,
                           "responseId": rid})
        if not sse_mode:  # without alt=sse: one JSON array, streamed element by element
            return web.Response(text=pretty(chunks), content_type="application/json", charset="UTF-8",
                                headers={**HEADERS, **r.headers})
        resp = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream",
                                           "Content-Disposition": "attachment", **r.headers})
        await resp.prepare(request)
        for i, chunk in enumerate(chunks):
            if r.error_after is not None and i >= r.error_after:
                await resp.write(sse({"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                                                "status": "UNAVAILABLE"}}))
                await resp.write_eof()
                return resp
            if r.drop_after is not None and i >= r.drop_after:
                request.transport.abort()
                return resp
            await pause(r)
            await resp.write(sse(chunk))
        await resp.write_eof()
        return resp

    def embed(self, rec: Recorded, r: Reply) -> web.Response:
        reqs = rec.json.get("requests")
        if not isinstance(reqs, list) or not reqs:
            return self.error(400, None, "* BatchEmbedContentsRequest.requests: requests is not specified\n")
        out = []
        for q in reqs:
            text = "".join(p.get("text", "") for p in q["content"]["parts"])
            out.append({"values": embedding_values(text, q.get("outputDimensionality") or self.embed_dims)})
        return web.Response(text=pretty({"embeddings": out}), content_type="application/json", charset="UTF-8",
                            headers={**HEADERS, **r.headers})
