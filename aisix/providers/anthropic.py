"""``anthropic``: the Messages API behind the OpenAI chat completions API.

Request: ``POST {api_base}/messages`` with ``x-api-key`` and ``anthropic-version: 2023-06-01``
(https://docs.anthropic.com/en/api/messages). Translated from OpenAI: system/developer
messages → ``system``; user/assistant turns (consecutive turns of one role merged); text and
``image_url`` parts (``data:`` URLs → base64 source, other URLs → url source); assistant
``tool_calls`` → ``tool_use`` blocks; ``tool`` messages → ``tool_result`` blocks;
``max_completion_tokens``/``max_tokens`` → ``max_tokens`` (required by Anthropic: 4096 when the
client sets none, or ``provider_config.default_max_tokens``); ``temperature``, ``top_p``,
``stop`` → ``stop_sequences``; ``tools``/``tool_choice``/``parallel_tool_calls``;
``user`` → ``metadata.user_id``. ``n`` > 1 is refused (400). Dropped (no Anthropic
equivalent): ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs``,
``seed``, ``response_format``, ``reasoning_effort``.

Response: ``content`` blocks → ``message.content`` / ``tool_calls`` / ``reasoning_content``
(thinking); ``stop_reason`` → ``finish_reason``; usage: ``prompt_tokens`` = ``input_tokens`` +
``cache_creation_input_tokens`` + ``cache_read_input_tokens`` (cache reads also as
``prompt_tokens_details.cached_tokens``), ``completion_tokens`` = ``output_tokens``.
Streaming events (https://docs.anthropic.com/en/docs/build-with-claude/streaming) become
``chat.completion.chunk`` events, one out per useful one in, see :class:`AnthropicStreamDecoder`.
Errors (https://docs.anthropic.com/en/api/errors): ``{"type":"error","error":{"type","message"}}``.
"""
from __future__ import annotations

import re
import uuid
from typing import Mapping

import orjson

from aisix.config.resources import Model
from aisix.errors import GatewayError, error_type_for, invalid_request
from aisix.providers.base import ChatResult, Provider, StreamDecoder, Usage
from aisix.providers.errors import retry_headers
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

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

#: ``stop_reason`` → OpenAI ``finish_reason``
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls",
                  "refusal": "content_filter"}

#: Anthropic error types OpenAI's vocabulary also has; others take the type usual for the status
_SAME_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "rate_limit_error", "api_error"}

_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def tool_id(v) -> str:
    """A tool call id as Anthropic accepts it (``^[a-zA-Z0-9_-]+$``): other characters become ``_``,
    the same way for a ``tool_use`` and the ``tool_result`` that answers it."""
    return _BAD_ID_CHARS.sub("_", v) if isinstance(v, str) and v else "call_0"


def _user_blocks(content, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise invalid_request(f"`{where}` must be a string or an array of parts", "invalid_type", where)
    blocks = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = image_url_of(part, f"{where}[{i}]")
            inline = data_url(url)
            source = ({"type": "base64", "media_type": inline[0], "data": inline[1]} if inline
                      else {"type": "url", "url": url})
            blocks.append({"type": "image", "source": source})
        else:
            raise invalid_request(f"`{where}[{i}]`: part type `{shown(kind)}` is not supported by anthropic",
                                  "unsupported_content", where)
    return blocks


def _assistant_blocks(m: dict, where: str) -> list[dict]:
    blocks = [{"type": "text", "text": text_of(m.get("content"), f"{where}.content")}]
    if not blocks[0]["text"]:
        blocks = []
    for j, tc in enumerate(tool_calls_of(m, where)):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid_request(f"`{where}.tool_calls[{j}]` needs a function name", "invalid_tool_call", where)
        blocks.append({"type": "tool_use", "id": tool_id(tc.get("id")), "name": fn["name"],
                       "input": tool_arguments(fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")})
    return blocks


def convert_messages(messages) -> tuple[str | list[dict] | None, list[dict]]:
    """OpenAI ``messages`` → Anthropic ``(system, messages)``. Raises 400 for what cannot be said."""
    if not isinstance(messages, list) or not messages:
        raise invalid_request("`messages` must be a non-empty array", "invalid_messages", "messages")
    system: list[str] = []
    out: list[dict] = []

    def add(role: str, blocks: list[dict]) -> None:
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)  # Anthropic wants turns to alternate
        else:
            out.append({"role": role, "content": blocks})

    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        m = message_of(m, where)
        role = m.get("role")
        if role in ("system", "developer"):
            text = text_of(m.get("content"), f"{where}.content")
            if text:
                system.append(text)
        elif role == "user":
            add("user", _user_blocks(m.get("content"), f"{where}.content"))
        elif role == "assistant":
            blocks = _assistant_blocks(m, where)
            if blocks:
                add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": tool_id(m.get("tool_call_id")),
                          "content": text_of(m.get("content"), f"{where}.content")}])
        else:
            raise invalid_request(f"`{where}.role` `{shown(role)}` is not supported by anthropic", "invalid_role",
                                  where)
    for msg in out:  # a lone text block reads better as the plain string form
        c = msg["content"]
        if len(c) == 1 and c[0]["type"] == "text":
            msg["content"] = c[0]["text"]
        elif not c:
            msg["content"] = ""
    sys_field: str | list[dict] | None = None
    if len(system) == 1:
        sys_field = system[0]
    elif system:
        sys_field = [{"type": "text", "text": s} for s in system]
    return sys_field, out


def _tool_choice(choice, parallel) -> dict | None:
    tc: dict | None
    if choice is None:
        tc = None
    elif choice == "auto":
        tc = {"type": "auto"}
    elif choice == "required":
        tc = {"type": "any"}
    elif choice == "none":
        tc = {"type": "none"}
    elif (name := tool_choice_name(choice)) is not None:
        tc = {"type": "tool", "name": name}
    else:
        raise invalid_request("`tool_choice` is not valid", "invalid_tool_choice", "tool_choice")
    if parallel is False and (tc is None or tc["type"] != "none"):
        tc = {**(tc or {"type": "auto"}), "disable_parallel_tool_use": True}
    return tc


def messages_request(model_id: str, body: dict, stream: bool, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """The Messages API body for an OpenAI chat completion ``body``."""
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid_request("anthropic returns one choice: `n` must be 1", "unsupported_parameter", "n")
    system, messages = convert_messages(body.get("messages"))
    out: dict = {"model": model_id, "max_tokens": max_tokens_of(body) or default_max_tokens}
    if system is not None:
        out["system"] = system
    out["messages"] = messages
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stops = stop_list(body.get("stop"))
    if stops:
        out["stop_sequences"] = stops
    tools = function_tools(body.get("tools"))
    if tools:
        out["tools"] = [{"name": f["name"], **({"description": f["description"]} if f.get("description") else {}),
                         "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
                        for f in tools]
    tc = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tc is not None and tools:
        out["tool_choice"] = tc
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if stream:
        out["stream"] = True
    return out


def usage_of(u) -> tuple[Usage, int]:
    """Anthropic ``usage`` → (OpenAI usage, cached prompt tokens); anything but an object counts 0."""
    if not isinstance(u, Mapping):
        u = {}
    cached = as_int(u.get("cache_read_input_tokens"))
    written = as_int(u.get("cache_creation_input_tokens"))
    prompt = as_int(u.get("input_tokens")) + written + cached
    completion = as_int(u.get("output_tokens"))
    return Usage(prompt, completion, prompt + completion, cached, written), cached


def _finish(reason) -> str:
    """``stop_reason`` → ``finish_reason`` (an unknown reason, or one that is not a string: ``stop``)."""
    return FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"


def _tool_call(block: dict, what: str) -> dict:
    """A ``tool_use`` block → an OpenAI tool call (502 without a name, or with an ``input`` that
    is not an object)."""
    name = block.get("name")
    if not isinstance(name, str) or not name:
        raise malformed("anthropic", f"{what} (a `tool_use` without a `name`)")
    args = opt_dict(block.get("input"), "anthropic", f"{what} (`input` of a `tool_use`)")
    return {"id": str_or(block.get("id"), f"call_{uuid.uuid4().hex[:24]}"), "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(args).decode()}}


class AnthropicProvider(Provider):
    name = "anthropic"
    default_api_base = "https://api.anthropic.com/v1"
    key_header, key_prefix = "x-api-key", ""

    @guard_request
    def chat_request(self, model: Model, body: dict, stream: bool, headers: dict[str, str]) -> UpstreamRequest:
        cfg = model.provider_config
        default = (cfg.model_extra or {}).get("default_max_tokens")
        default = default if isinstance(default, int) and default > 0 else DEFAULT_MAX_TOKENS
        h = self.headers(model, {"anthropic-version": API_VERSION, **headers})
        doc = messages_request(model.model_id, body, stream, default)
        return UpstreamRequest(f"{self.base_url(model)}/messages", h, orjson.dumps(doc))

    @guard_response
    def chat_response(self, body: bytes) -> ChatResult:
        """The Messages API's response → a chat completion. Content of the wrong type (``content``
        not an array, a ``text`` that is not a string, a ``tool_use`` without a name) is a 502;
        metadata of the wrong type (``id``, ``model``, ``usage``, ``stop_reason``) is ignored."""
        obj = load_object(body, self.name)
        texts, reasoning, calls = [], [], []
        for i, block in enumerate(opt_list(obj.get("content"), self.name, "response (`content`)")):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(opt_str(block.get("text"), self.name, f"response (`content[{i}].text`)"))
            elif kind == "thinking":
                reasoning.append(opt_str(block.get("thinking"), self.name, f"response (`content[{i}].thinking`)"))
            elif kind == "tool_use":
                calls.append(_tool_call(block, f"response (`content[{i}]`)"))
        finish = _finish(obj.get("stop_reason"))
        usage, cached = usage_of(obj.get("usage"))
        model = str_or(obj.get("model"), "")
        choice = {"index": 0, "message": assistant_message("".join(texts), calls, "".join(reasoning)),
                  "logprobs": None, "finish_reason": finish}
        doc = chat_completion(str_or(obj.get("id"), ""), model, [choice], usage_object(usage, cached))
        return ChatResult(doc, usage, model or None, (finish,))

    def stream_decoder(self, include_usage: bool) -> StreamDecoder:
        return AnthropicStreamDecoder(include_usage)

    @guard_error
    def error_from_response(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
        """``{"type":"error","error":{"type":..., "message":...}}`` → the OpenAI envelope, same
        status; the Anthropic error type is kept as ``code``, ``Retry-After`` is kept. Another
        body: see :func:`~aisix.providers.translate.error_envelope`."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        err = doc.get("error") if isinstance(doc, dict) else None
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            return error_envelope(self.name, status, headers, body)
        atype = err.get("type") if isinstance(err.get("type"), str) else None
        etype = atype if atype in _SAME_TYPES else error_type_for(status)
        hdrs = retry_headers(headers)
        message = err["message"] or f"upstream {self.name} answered HTTP {status}"
        return GatewayError(status, message, etype, atype, hdrs)


class AnthropicStreamDecoder(ChunkDecoder):
    """Messages API stream events → ``chat.completion.chunk`` events.

    ``message_start`` → the role chunk (``delta: {role, content: ""}``); ``content_block_start``
    of a ``tool_use`` → the tool call's opening chunk (index, id, type, name, ``arguments: ""``);
    ``content_block_delta``: ``text_delta`` → ``content``, ``input_json_delta`` → argument
    fragment, ``thinking_delta`` → ``reasoning_content``; ``message_delta`` → the
    ``finish_reason`` chunk; ``message_stop`` → the usage chunk (if the client asked) and
    ``data: [DONE]``; ``error`` → :attr:`error`. ``content_block_stop`` of a ``tool_use`` whose
    arguments never came (a tool without parameters) → ``arguments: "{}"``, so the fragments add up
    to the same valid JSON as the non-streamed ``input: {}``. ``ping``, other ``content_block_stop``s,
    ``signature_delta`` and empty fragments send nothing. Usage is set from ``message_start``
    and updated by each ``message_delta`` (its counts are cumulative).
    """

    provider = "anthropic"

    def __init__(self, include_usage: bool):
        super().__init__(include_usage)
        self.tool_index: dict[int, int] = {}  # content block index → OpenAI tool call index
        self.tool_args: set[int] = set()  # content block indexes of tool calls whose arguments began
        self._raw_usage: dict = {}

    def _set_usage(self, u) -> None:
        if isinstance(u, dict):
            self._raw_usage.update({k: v for k, v in u.items() if v is not None})
            self.usage, cached = usage_of(self._raw_usage)
            self.usage_obj = usage_object(self.usage, cached)

    def on_event(self, obj: dict, name: str | None) -> bytes | None:
        kind = obj.get("type") or name
        if kind == "content_block_delta":
            return self._delta(obj)
        if kind == "message_start":
            msg = opt_dict(obj.get("message"), self.provider, "message_start event (`message`)")
            self.id = str_or(msg.get("id"), "")
            self.response_model = str_or(msg.get("model"), None)
            self._set_usage(msg.get("usage"))
            return self.chunk([self.choice(0, {"role": "assistant", "content": ""})])
        if kind == "content_block_start":
            block = opt_dict(obj.get("content_block"), self.provider, "content_block_start event (`content_block`)")
            btype = block.get("type")
            if btype == "tool_use":
                index = obj.get("index")
                if index_of(index, -1) < 0:
                    raise malformed(self.provider, "content_block_start event (`index`)")
                call = _tool_call(block, "content_block_start event")
                k = self.tool_index[index] = len(self.tool_index)
                self.token = True
                return self.chunk([self.choice(0, {"tool_calls": [
                    {"index": k, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}]})])
            if btype == "text":
                text = opt_str(block.get("text"), self.provider, "content_block_start event (`content_block.text`)")
                return self._text("content", text) if text else None
            return None
        if kind == "message_delta":
            self._set_usage(obj.get("usage"))
            reason = opt_dict(obj.get("delta"), self.provider, "message_delta event (`delta`)").get("stop_reason")
            if reason is None:
                return None
            finish = _finish(reason)
            self.finished = True
            self.finish_reasons.append(finish)
            return self.chunk([self.choice(0, {}, finish)])
        if kind == "message_stop":
            return self.tail()
        if kind == "error":
            err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
            atype = err.get("type") if isinstance(err.get("type"), str) else None
            message = json_text(err["message"]) if err.get("message") is not None else ""
            self.stream_error(message, atype if atype in _SAME_TYPES else "api_error", atype)
            return None
        if kind == "content_block_stop":
            index = obj.get("index")
            k = self.tool_index.get(index) if index_of(index, -1) >= 0 else None
            if k is None or index in self.tool_args:
                return None
            self.tool_args.add(index)  # a tool call with no parameters: "{}", as the non-streamed path gives
            return self.chunk([self.choice(0, {"tool_calls": [{"index": k, "function": {"arguments": "{}"}}]})])
        return None  # ping and event types added later

    def _text(self, field: str, text: str) -> bytes:
        self.token = True
        return self.chunk([self.choice(0, {field: text})])

    def _delta(self, obj: dict) -> bytes | None:
        what = "content_block_delta event"
        delta = opt_dict(obj.get("delta"), self.provider, f"{what} (`delta`)")
        dtype = delta.get("type")
        if dtype == "text_delta":
            text = opt_str(delta.get("text"), self.provider, f"{what} (`delta.text`)")
            return self._text("content", text) if text else None
        if dtype == "thinking_delta":
            text = opt_str(delta.get("thinking"), self.provider, f"{what} (`delta.thinking`)")
            return self._text("reasoning_content", text) if text else None
        if dtype == "input_json_delta":
            part = opt_str(delta.get("partial_json"), self.provider, f"{what} (`delta.partial_json`)")
            index = obj.get("index")
            k = self.tool_index.get(index) if index_of(index, -1) >= 0 else None
            if not part or k is None:
                return None
            self.token = True
            self.tool_args.add(index)
            return self.chunk([self.choice(0, {"tool_calls": [
                {"index": k, "function": {"arguments": part}}]})])
        return None  # signature_delta, citations_delta, empty fragments
