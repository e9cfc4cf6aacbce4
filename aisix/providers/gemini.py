"""``gemini``: the Gemini API (generateContent) behind the OpenAI chat completions API.

Request (https://ai.google.dev/api/generate-content): ``POST
{api_base}/models/{model}:generateContent``, or ``:streamGenerateContent?alt=sse`` for a
stream, with ``x-goog-api-key``. Translated from OpenAI: system/developer messages →
``systemInstruction``; ``user`` → role ``user``, ``assistant`` → role ``model`` (consecutive
turns of one role merged); text parts; ``image_url`` parts (``data:`` URLs → ``inlineData``,
other URLs → ``fileData``); assistant ``tool_calls`` → ``functionCall`` parts; ``tool``
messages → ``functionResponse`` parts (named after the call they answer; a non-object result
is sent as ``{"output": text}``); ``generationConfig``: ``temperature``, ``topP``,
``maxOutputTokens``, ``stopSequences``, ``candidateCount`` (``n``), ``presencePenalty``,
``frequencyPenalty``, ``seed``, and ``response_format`` → ``responseMimeType`` (+
``responseJsonSchema``); ``tools`` → ``functionDeclarations`` (``parametersJsonSchema``);
``tool_choice`` → ``toolConfig.functionCallingConfig`` (AUTO / ANY / NONE,
``allowedFunctionNames``) (https://ai.google.dev/gemini-api/docs/function-calling).
Dropped (no Gemini equivalent here yet): ``logprobs``, ``logit_bias``, ``reasoning_effort``,
``parallel_tool_calls``, ``user``.

Response: each candidate → a choice; ``text`` parts → ``content`` (``thought: true`` parts →
``reasoning_content``); ``functionCall`` parts → ``tool_calls`` (Gemini gives no call id: one is
made up, and a part's ``thoughtSignature`` rides along in it after ``~`` so it is sent back
with the call on the next turn, as Gemini 3 requires); ``finishReason`` → ``finish_reason``
(``STOP`` → ``stop``, or ``tool_calls`` when the candidate called a function; ``MAX_TOKENS`` →
``length``; ``SAFETY``/``RECITATION``/``BLOCKLIST``/``PROHIBITED_CONTENT``/``SPII``/image
safety → ``content_filter``; others → ``stop``); ``usageMetadata`` → usage:
``prompt_tokens`` = ``promptTokenCount`` + ``toolUsePromptTokenCount``, ``completion_tokens`` =
``candidatesTokenCount`` + ``thoughtsTokenCount`` (also as ``reasoning_tokens``),
``cachedContentTokenCount`` → ``cached_tokens``. Errors:
``{"error":{"code","message","status"}}`` (https://ai.google.dev/gemini-api/docs/troubleshooting);
a 429's ``RetryInfo.retryDelay`` becomes ``Retry-After`` when no header says it.
Embeddings: see :mod:`aisix.providers.gemini_embed`.
"""
from __future__ import annotations

import math
import mimetypes
import uuid
from typing import Mapping

import orjson

from aisix.config.resources import Model
from aisix.errors import GatewayError, error_type_for, invalid_request
from aisix.providers.base import ChatResult, Provider, StreamDecoder, Usage
from aisix.providers.errors import retry_headers
from aisix.providers.gemini_embed import batch_embed_request, embeddings_to_openai
from aisix.providers.translate import (
    ChunkDecoder,
    as_int,
    assistant_message,
    chat_completion,
    data_url,
    error_envelope,
    function_tools,
    guard_error,
    guard_request,
    guard_response,
    image_url_of,
    index_of,
    json_text,
    load_object,
    malformed,
    max_tokens_of,
    message_of,
    new_chat_id,
    opt_dict,
    opt_list,
    opt_str,
    shown,
    stop_list,
    str_or,
    text_of,
    tool_arguments,
    tool_calls_of,
    tool_choice_name,
    usage_object,
)
from aisix.upstream.pool import UpstreamRequest

_FILTERED = ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
             "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION")
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", **{r: "content_filter" for r in _FILTERED}}

#: separates a made-up tool call id from the part's ``thoughtSignature`` (base64 has no ``~``)
SIGNATURE_MARK = "~"


def finish_reason(reason, called: bool) -> str:
    """Gemini ``finishReason`` → OpenAI ``finish_reason`` (``tool_calls`` if the candidate called a
    function); an unknown reason, or one that is not a string, is ``stop``."""
    mapped = FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"
    return "tool_calls" if called and mapped == "stop" else mapped


def model_path(model_id: str) -> str:
    """``models/{id}`` (a model id given with the ``models/`` prefix is taken as is)."""
    return model_id if model_id.startswith(("models/", "tunedModels/")) else f"models/{model_id}"


def _user_parts(content, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise invalid_request(f"`{where}` must be a string or an array of parts", "invalid_type", where)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            url = image_url_of(part, f"{where}[{i}]")
            inline = data_url(url)
            if inline:
                parts.append({"inlineData": {"mimeType": inline[0], "data": inline[1]}})
            else:
                mime = mimetypes.guess_type(url.split("?")[0])[0]
                parts.append({"fileData": {**({"mimeType": mime} if mime else {}), "fileUri": url}})
        else:
            raise invalid_request(f"`{where}[{i}]`: part type `{shown(kind)}` is not supported by gemini",
                                  "unsupported_content", where)
    return parts


def _function_response(content, where: str) -> dict:
    text = text_of(content, where)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        obj = None
    return obj if isinstance(obj, dict) else {"output": text}


def convert_messages(messages) -> tuple[dict | None, list[dict]]:
    """OpenAI ``messages`` → Gemini ``(systemInstruction, contents)``. Raises 400."""
    if not isinstance(messages, list) or not messages:
        raise invalid_request("`messages` must be a non-empty array", "invalid_messages", "messages")
    system: list[dict] = []
    contents: list[dict] = []
    names: dict[str, str] = {}  # tool call id → function name, for the tool messages that answer

    def add(role: str, parts: list[dict]) -> None:
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        m = message_of(m, where)
        role = m.get("role")
        if role in ("system", "developer"):
            text = text_of(m.get("content"), f"{where}.content")
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", _user_parts(m.get("content"), f"{where}.content"))
        elif role == "assistant":
            text = text_of(m.get("content"), f"{where}.content")
            parts = [{"text": text}] if text else []
            for j, tc in enumerate(tool_calls_of(m, where)):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise invalid_request(f"`{where}.tool_calls[{j}]` needs a function name", "invalid_tool_call", where)
                call_id = tc.get("id") if isinstance(tc.get("id"), str) else ""
                names[call_id] = fn["name"]
                part: dict = {"functionCall": {"name": fn["name"], "args": tool_arguments(
                    fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")}}
                _, mark, signature = call_id.partition(SIGNATURE_MARK)
                if mark and signature:
                    part["thoughtSignature"] = signature
                parts.append(part)
            if parts:
                add("model", parts)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            name = names.get(call_id) if isinstance(call_id, str) else None
            name = name or m.get("name")
            if not isinstance(name, str):
                raise invalid_request(f"`{where}.tool_call_id` answers no earlier tool call", "invalid_tool_call_id", where)
            add("user", [{"functionResponse": {"name": name,
                                               "response": _function_response(m.get("content"), f"{where}.content")}}])
        else:
            raise invalid_request(f"`{where}.role` `{shown(role)}` is not supported by gemini", "invalid_role", where)
    return ({"parts": system} if system else None), contents


def _generation_config(body: dict) -> dict:
    cfg: dict = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("presence_penalty", "presencePenalty"),
                     ("frequency_penalty", "frequencyPenalty"), ("seed", "seed")):
        if body.get(src) is not None:
            cfg[dst] = body[src]
    if (mt := max_tokens_of(body)) is not None:
        cfg["maxOutputTokens"] = mt
    if stops := stop_list(body.get("stop")):
        cfg["stopSequences"] = stops
    if body.get("n") is not None:
        cfg["candidateCount"] = body["n"]
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        cfg["responseMimeType"] = "application/json"
        js = rf.get("json_schema")
        if rf["type"] == "json_schema" and js is not None and not isinstance(js, dict):
            raise invalid_request("`response_format.json_schema` must be an object", "invalid_type",
                                  "response_format.json_schema")
        schema = js.get("schema") if rf["type"] == "json_schema" and js else None
        if isinstance(schema, dict):
            cfg["responseJsonSchema"] = schema
    return cfg


def _tool_config(choice) -> dict | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]
        return {"functionCallingConfig": {"mode": mode}}
    if (name := tool_choice_name(choice)) is not None:
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    raise invalid_request("`tool_choice` is not valid", "invalid_tool_choice", "tool_choice")


def generate_request(body: dict) -> dict:
    """The ``GenerateContentRequest`` body for an OpenAI chat completion ``body``."""
    system, contents = convert_messages(body.get("messages"))
    out: dict = {"contents": contents}
    if system is not None:
        out["systemInstruction"] = system
    tools = function_tools(body.get("tools"))
    if tools:
        out["tools"] = [{"functionDeclarations": [
            {"name": f["name"], **({"description": f["description"]} if f.get("description") else {}),
             **({"parametersJsonSchema": f["parameters"]} if f.get("parameters") else {})} for f in tools]}]
        if (tc := _tool_config(body.get("tool_choice"))) is not None:
            out["toolConfig"] = tc
    if cfg := _generation_config(body):
        out["generationConfig"] = cfg
    return out


def usage_of(meta) -> tuple[Usage, dict] | None:
    """``usageMetadata`` → (OpenAI usage, the OpenAI ``usage`` object); None if absent."""
    if not isinstance(meta, dict):
        return None
    prompt = as_int(meta.get("promptTokenCount")) + as_int(meta.get("toolUsePromptTokenCount"))
    thoughts = as_int(meta.get("thoughtsTokenCount"))
    completion = as_int(meta.get("candidatesTokenCount")) + thoughts
    total = as_int(meta.get("totalTokenCount")) or prompt + completion
    cached = as_int(meta.get("cachedContentTokenCount"))
    u = Usage(prompt, completion, total, min(cached, prompt))
    return u, usage_object(u, cached, thoughts)


def new_call_id(signature=None) -> str:
    base = f"call_{uuid.uuid4().hex[:24]}"
    return f"{base}{SIGNATURE_MARK}{signature}" if isinstance(signature, str) and signature else base


def _tool_call(part: dict, what: str) -> dict:
    fc = part["functionCall"]
    name = fc.get("name")
    if not isinstance(name, str) or not name:
        raise malformed("gemini", f"{what} (a `functionCall` without a `name`)")
    args = opt_dict(fc.get("args"), "gemini", f"{what} (`functionCall.args`)")
    return {"id": new_call_id(part.get("thoughtSignature")), "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(args).decode()}}


def read_parts(candidate: dict, what: str = "response") -> tuple[str, str, list[dict]]:
    """A candidate's (text, thought text, tool calls without ``index``). 502 when ``content`` or
    ``content.parts`` or a part's ``text`` has the wrong type, or a ``functionCall`` is unusable."""
    text, thought, calls = [], [], []
    content = opt_dict(candidate.get("content"), "gemini", f"{what} (`content`)")
    for part in opt_list(content.get("parts"), "gemini", f"{what} (`content.parts`)"):
        if not isinstance(part, dict):
            continue
        if part.get("functionCall") is not None:
            if not isinstance(part["functionCall"], dict):
                raise malformed("gemini", f"{what} (`functionCall`)")
            calls.append(_tool_call(part, what))
        elif part.get("text") is not None:
            (thought if part.get("thought") else text).append(opt_str(part["text"], "gemini", f"{what} (`text`)"))
    return "".join(text), "".join(thought), calls


class GeminiProvider(Provider):
    name = "gemini"
    default_api_base = "https://generativelanguage.googleapis.com/v1beta"

    key_header, key_prefix = "x-goog-api-key", ""

    @guard_request
    def chat_request(self, model: Model, body: dict, stream: bool, headers: dict[str, str]) -> UpstreamRequest:
        method = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
        url = f"{self.base_url(model)}/{model_path(model.model_id)}{method}"
        return UpstreamRequest(url, self.headers(model, headers), orjson.dumps(generate_request(body)))

    @guard_response
    def chat_response(self, body: bytes) -> ChatResult:
        """A ``GenerateContentResponse`` → a chat completion. Content of the wrong type
        (``candidates``/``parts`` not arrays, a ``text`` that is not a string, a ``functionCall``
        without a name) is a 502; metadata of the wrong type (ids, indexes, reasons, usage) is ignored."""
        obj = load_object(body, self.name)
        choices, reasons = [], []
        for pos, cand in enumerate(opt_list(obj.get("candidates"), self.name, "response (`candidates`)")):
            if not isinstance(cand, dict):
                continue
            text, thought, calls = read_parts(cand, f"response (`candidates[{pos}]`)")
            for k, c in enumerate(calls):
                c["index"] = k
            finish = finish_reason(cand.get("finishReason") or "STOP", bool(calls))
            reasons.append(finish)
            choices.append({"index": index_of(cand.get("index"), pos),
                            "message": assistant_message(text, calls, thought),
                            "logprobs": None, "finish_reason": finish})
        if not choices and isinstance(obj.get("promptFeedback"), dict):  # the prompt itself was blocked
            reasons.append("content_filter")
            choices.append({"index": 0, "message": assistant_message(None, [], None), "logprobs": None,
                            "finish_reason": "content_filter"})
        u = usage_of(obj.get("usageMetadata"))
        model = str_or(obj.get("modelVersion"), "")
        cid = str_or(obj.get("responseId"), None) or new_chat_id()
        doc = chat_completion(cid, model, choices, u[1] if u else None)
        return ChatResult(doc, u[0] if u else None, model or None, tuple(reasons))

    def stream_decoder(self, include_usage: bool) -> StreamDecoder:
        return GeminiStreamDecoder(include_usage)

    @guard_request
    def embeddings_request(self, model: Model, body: dict, headers: dict[str, str]) -> UpstreamRequest:
        return batch_embed_request(self.base_url(model), model_path(model.model_id), body,
                                   self.headers(model, headers))

    @guard_response
    def embeddings_response(self, body: bytes, request: UpstreamRequest | None = None) -> ChatResult:
        return embeddings_to_openai(load_object(body, self.name), request)

    @guard_error
    def error_from_response(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
        """``{"error":{"code","message","status"}}`` → the OpenAI envelope with the same HTTP status;
        the Google status (e.g. ``RESOURCE_EXHAUSTED``) becomes ``code``. Another body: see
        :func:`~aisix.providers.translate.error_envelope`."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, list) and doc:  # some front ends wrap the error in an array
            doc = doc[0]
        err = doc.get("error") if isinstance(doc, dict) else None
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            return error_envelope(self.name, status, headers, body)
        hdrs = retry_headers(headers)
        delay = _retry_delay(err.get("details"))
        if delay is not None and not any(name.lower() == "retry-after" for name in hdrs):
            hdrs["Retry-After"] = delay
        code = err.get("status") if isinstance(err.get("status"), str) else None
        if any(isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID"
               for d in (err.get("details") if isinstance(err.get("details"), list) else ())):
            code = "API_KEY_INVALID"  # a 400 that is the provider key's fault (google.rpc.ErrorInfo reason)
        message = err["message"] or f"upstream {self.name} answered HTTP {status}"
        return GatewayError(status, message, error_type_for(status), code, hdrs)

    def refused_credentials(self, status: int, err: GatewayError) -> bool:
        """Gemini answers a bad API key with 400 ``INVALID_ARGUMENT`` (reason ``API_KEY_INVALID``,
        https://ai.google.dev/gemini-api/docs/troubleshooting), 403 ``PERMISSION_DENIED`` for a key without access."""
        return super().refused_credentials(status, err) or err.code == "API_KEY_INVALID"


def _retry_delay(details) -> str | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail (``"retryDelay": "32s"``), rounded up."""
    for d in details if isinstance(details, list) else ():
        delay = d.get("retryDelay") if isinstance(d, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                secs = float(delay[:-1])
            except ValueError:
                continue
            if not math.isfinite(secs):
                continue
            return str(max(0, int(-(-secs // 1))))
    return None


class GeminiStreamDecoder(ChunkDecoder):
    """``streamGenerateContent?alt=sse`` events (each a whole ``GenerateContentResponse``) →
    ``chat.completion.chunk`` events, one out per event that carries output.

    The first chunk of each candidate carries ``role``; text → ``content``, thought text →
    ``reasoning_content``, each ``functionCall`` → a whole tool call (index, id, type, name,
    arguments) in one chunk; a ``finishReason`` → a ``finish_reason`` chunk after it.
    ``usageMetadata`` (cumulative in every event) sets :attr:`usage` each time. Gemini sends no
    terminator: :meth:`end` at the upstream's clean close writes the usage chunk (if asked for)
    and ``data: [DONE]``. ``{"error": {...}}`` in the stream → :attr:`error`.
    """

    provider = "gemini"

    def __init__(self, include_usage: bool):
        super().__init__(include_usage)
        self.started: set[int] = set()     # candidates whose role chunk went out
        self.tool_count: dict[int, int] = {}  # candidate → tool calls so far

    def on_event(self, obj: dict, name: str | None) -> bytes | None:
        err = obj.get("error")
        if isinstance(err, dict):
            status = err.get("status") if isinstance(err.get("status"), str) else None
            code = err.get("code")
            etype = (error_type_for(code) if isinstance(code, int) and not isinstance(code, bool) and code < 500
                     else "api_error")
            message = json_text(err["message"]) if err.get("message") is not None else ""
            self.stream_error(message, etype, status)
            return None
        if not self.id:
            self.id = str_or(obj.get("responseId"), None) or new_chat_id()
        if self.response_model is None and isinstance(obj.get("modelVersion"), str):
            self.response_model = obj["modelVersion"]
        u = usage_of(obj.get("usageMetadata"))
        if u is not None:
            self.usage, self.usage_obj = u
        out, finishes = [], []
        for pos, cand in enumerate(opt_list(obj.get("candidates"), self.provider, "stream event (`candidates`)")):
            if not isinstance(cand, dict):
                continue
            idx = index_of(cand.get("index"), pos)
            text, thought, calls = read_parts(cand, f"stream event (`candidates[{pos}]`)")
            delta: dict = {}
            if idx not in self.started:
                self.started.add(idx)
                delta["role"] = "assistant"
            if thought:
                delta["reasoning_content"] = thought
            if text or ("role" in delta and not calls):
                delta["content"] = text
            if calls:
                first = self.tool_count.get(idx, 0)
                for k, c in enumerate(calls):
                    c["index"] = first + k
                self.tool_count[idx] = first + len(calls)
                delta["tool_calls"] = [{"index": c["index"], "id": c["id"], "type": "function",
                                        "function": c["function"]} for c in calls]
            if text or thought or calls:
                self.token = True
            if delta:
                out.append(self.choice(idx, delta))
            if cand.get("finishReason"):
                finish = finish_reason(cand["finishReason"], idx in self.tool_count)
                self.finished = True
                self.finish_reasons.append(finish)
                finishes.append(self.choice(idx, {}, finish))
        if not out and not finishes and isinstance(obj.get("promptFeedback"), dict) \
                and obj["promptFeedback"].get("blockReason"):
            self.finished = True
            self.finish_reasons.append("content_filter")
            finishes.append(self.choice(0, {}, "content_filter"))
        data = self.chunk(out) if out else b""
        if finishes:
            data += self.chunk(finishes)
        return data or None
