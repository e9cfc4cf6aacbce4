"""The Anthropic Messages API in front of chat completions: pure functions, events in, events out.

A client of ``POST /v1/messages`` (https://docs.anthropic.com/en/api/messages) whose model is on
a provider other than ``anthropic`` gets its request as a chat completion (:func:`chat_body`),
which that provider's own translator then takes on as for ``/v1/chat/completions``; the answer
comes back as a Message (:func:`message_result`) or, streamed, as the Messages API's event
sequence (:class:`MessagesEncoder`, fed with ``chat.completion.chunk`` objects,
https://docs.anthropic.com/en/docs/build-with-claude/streaming). Errors take Anthropic's envelope
``{"type": "error", "error": {"type", "message"}}`` (https://docs.anthropic.com/en/api/errors).

Request: ``system`` → a system message; ``text`` blocks → text (one block: a string; several:
joined with a new line); ``image`` blocks (base64 or url source) → ``image_url`` parts; assistant
``tool_use`` blocks → ``tool_calls``; ``tool_result`` blocks → ``tool`` messages (before the
rest of their user turn); ``thinking``/``redacted_thinking`` blocks of earlier turns are dropped
(no chat field takes them back); ``max_tokens`` → ``max_tokens`` (``max_completion_tokens`` for
the ``openai`` provider); ``stop_sequences`` → ``stop``; ``temperature``, ``top_p``;
``metadata.user_id`` → ``user``; custom ``tools`` → function tools; ``tool_choice`` (``auto``,
``any`` → ``required``, ``tool``, ``none``; ``disable_parallel_tool_use`` →
``parallel_tool_calls: false``). Dropped (no chat equivalent): ``top_k``, ``thinking`` (the
upstream model reasons or not on its own; its reasoning comes back as ``thinking`` blocks),
``cache_control``, ``service_tier``. Refused (400): ``document`` and server-tool blocks, server
tools (``bash_…``, ``web_search_…``, …), ``mcp_servers``, ``container``, images in tool results.
"""
from __future__ import annotations

import uuid

import orjson

from aisix.errors import GatewayError, invalid_request
from aisix.providers.base import BYTES_PER_TOKEN, ChatResult
from aisix.providers.reencode import ArgsScan, ChunkEncoder
from aisix.providers.translate import (
    as_int,
    guard_answer,
    load_object,
    malformed,
    message_of,
    opt_list,
    shown,
)

#: Anthropic's error ``type`` for each status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
_ANTHROPIC_TYPES = frozenset(ERROR_TYPES.values())

#: chat ``finish_reason`` → Messages ``stop_reason``
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}

#: The tokens :func:`estimate_input_tokens` counts for one image (Anthropic's figure for an image
#: of about 1.15 megapixels, the largest it takes unresized: https://docs.anthropic.com/en/docs/build-with-claude/vision).
IMAGE_TOKENS = 1600

_REFUSED_FIELDS = ("mcp_servers", "container")


# -- errors ---------------------------------------------------------------------------------------
def anthropic_error_type(err: GatewayError) -> str:
    """The Anthropic error ``type`` of ``err``: its ``code`` when that is one (an Anthropic
    upstream's own), else the one Anthropic uses for its status (:data:`ERROR_TYPES`; another
    5xx: ``api_error``, another 4xx: ``invalid_request_error``)."""
    if err.code in _ANTHROPIC_TYPES:
        return err.code
    return ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")


def anthropic_error_body(err: GatewayError) -> dict:
    """``{"type": "error", "error": {"type", "message"}}`` for ``err``."""
    return {"type": "error", "error": {"type": anthropic_error_type(err), "message": err.message}}


class AnthropicError(GatewayError):
    """A :class:`GatewayError` whose body is Anthropic's envelope (same status and headers)."""

    def body(self) -> dict:
        return anthropic_error_body(self)

    @classmethod
    def of(cls, err: GatewayError) -> AnthropicError:
        """``err`` (any GatewayError) in Anthropic's envelope."""
        if isinstance(err, cls):
            return err
        out = cls(err.status, err.message, err.type, err.code, err.headers, err.param)
        out.upstream_status = err.upstream_status
        return out


# -- request ----------------------------------------------------------------------------------------
def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise invalid_request(f"{where}: Input should be a valid string or a list of content blocks",
                              "invalid_type", where)
    return content


def _text(block: dict, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid_request(f"{where}.text: Input should be a valid string", "invalid_type", f"{where}.text")
    return text


def _image_part(block: dict, where: str) -> dict:
    src = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "base64" and isinstance(src.get("media_type"), str) and isinstance(src.get("data"), str):
        url = f"data:{src['media_type']};base64,{src['data']}"
    elif kind == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise invalid_request(f"{where}.source: an image needs a base64 (media_type, data) or url source",
                              "invalid_image", f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _joined(texts: list[str]) -> str:
    return texts[0] if len(texts) == 1 else "\n".join(texts)


def _tool_result(block: dict, where: str) -> dict:
    tid = block.get("tool_use_id")
    if not isinstance(tid, str) or not tid:
        raise invalid_request(f"{where}.tool_use_id: Field required", "invalid_tool_result", f"{where}.tool_use_id")
    content = block.get("content")
    texts: list[str] = []
    if content is not None:
        for j, part in enumerate(_blocks(content, f"{where}.content")):
            if part.get("type") != "text":
                raise invalid_request(f"{where}.content[{j}]: only text tool results can be translated to a chat "
                                      f"completion (got `{shown(part.get('type'))}`)", "unsupported_content",
                                      f"{where}.content")
            texts.append(_text(part, f"{where}.content[{j}]"))
    return {"role": "tool", "tool_call_id": tid, "content": _joined(texts) if texts else ""}


def _user(content, where: str) -> list[dict]:
    tools, parts = [], []
    for j, block in enumerate(_blocks(content, f"{where}.content")):
        w = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, w)})
        elif kind == "image":
            parts.append(_image_part(block, w))
        elif kind == "tool_result":
            tools.append(_tool_result(block, w))
        else:
            raise invalid_request(f"{w}: block type `{shown(kind)}` can't be translated to a chat completion",
                                  "unsupported_content", w)
    out = list(tools)
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": _joined([p["text"] for p in parts])})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _assistant(content, where: str) -> dict:
    texts, calls = [], []
    for j, block in enumerate(_blocks(content, f"{where}.content")):
        w = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text(block, w))
        elif kind == "tool_use":
            name, tid, args = block.get("name"), block.get("id"), block.get("input", {})
            if not isinstance(name, str) or not isinstance(tid, str) or not isinstance(args, dict):
                raise invalid_request(f"{w}: a tool_use block needs an id, a name and an input object",
                                      "invalid_tool_use", w)
            calls.append({"id": tid, "type": "function",
                          "function": {"name": name, "arguments": orjson.dumps(args).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise invalid_request(f"{w}: block type `{shown(kind)}` can't be translated to a chat completion",
                                  "unsupported_content", w)
    msg: dict = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _system(system) -> str | None:
    if system is None:
        return None
    texts = [_text(b, f"system[{i}]") for i, b in enumerate(_blocks(system, "system"))]
    return "\n".join(texts) if texts else None


def _tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise invalid_request("tools: Input should be a valid list", "invalid_type", "tools")
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "custom") not in ("custom", None):
            kind = t.get("type") if isinstance(t, dict) else None
            raise invalid_request(f"{where}: tool type `{shown(kind)}` is an Anthropic server tool; only custom tools "
                                  "(name, input_schema) can be translated to a chat completion", "unsupported_tool", where)
        name, schema = t.get("name"), t.get("input_schema")
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise invalid_request(f"{where}: a tool needs a name and an input_schema object", "invalid_tool", where)
        fn: dict = {"name": name, "parameters": schema}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(tc, out: dict) -> None:
    if tc is None:
        return
    kind = tc.get("type") if isinstance(tc, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(tc.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
    else:
        raise invalid_request("tool_choice: expected {type: auto|any|tool|none}", "invalid_tool_choice", "tool_choice")
    if tc.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def chat_body(body: dict, max_tokens_field: str = "max_tokens") -> dict:
    """The chat completion body for a Messages API ``body`` (see the module's mapping). Raises 400
    (``param`` naming the Messages field) for what a chat completion cannot carry."""
    for name in _REFUSED_FIELDS:
        if body.get(name) is not None:
            raise invalid_request(f"{name}: not supported for models outside the anthropic provider",
                                  "unsupported_parameter", name)
    mt = body.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise invalid_request("max_tokens: Field required (a positive integer)", "invalid_type", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages: a non-empty list of messages is required", "invalid_type", "messages")
    out: dict = {"model": body.get("model"), "messages": []}
    system = _system(body.get("system"))
    if system:
        out["messages"].append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        m = message_of(m, where)
        role = m.get("role")
        if role == "user":
            out["messages"].extend(_user(m.get("content"), where))
        elif role == "assistant":
            out["messages"].append(_assistant(m.get("content"), where))
        else:
            raise invalid_request(f"{where}.role: Input should be 'user' or 'assistant'", "invalid_role", f"{where}.role")
    out[max_tokens_field] = mt
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid_request("stop_sequences: Input should be a list of strings", "invalid_type", "stop_sequences")
        if stops:
            out["stop"] = stops
    if body.get("tools") is not None:
        out["tools"] = _tools(body["tools"])
    _tool_choice(body.get("tool_choice"), out)
    meta = body.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
        out["user"] = meta["user_id"]
    if body.get("stream") is True:
        out["stream"] = True
    return out


def estimate_input_tokens(body: dict) -> int:
    """An estimate (tokens) of a Messages request's input, for ``count_tokens`` to providers that
    have no such endpoint: one token per :data:`~aisix.providers.base.BYTES_PER_TOKEN` bytes of the
    JSON of ``system``, ``messages`` and ``tools``, images (their base64 left out) counted
    :data:`IMAGE_TOKENS` each. Raises 400 for a request nested too deeply to serialise."""
    images = 0

    def strip(v):
        nonlocal images
        if isinstance(v, dict):
            if v.get("type") == "image":
                images += 1
                return None
            return {k: strip(x) for k, x in v.items() if k != "cache_control"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    try:
        size = len(orjson.dumps(strip([body.get("system"), body.get("messages"), body.get("tools")])))
    except (RecursionError, orjson.JSONEncodeError):  # deeper than JSON encoders go (orjson: 254 levels)
        raise invalid_request("messages: the request is nested too deeply to count", "invalid_request",
                              "messages") from None
    return -(-size // BYTES_PER_TOKEN) + images * IMAGE_TOKENS


# -- response ---------------------------------------------------------------------------------------
def stop_reason(finish) -> str:
    """A chat ``finish_reason`` as a Messages ``stop_reason`` (:data:`STOP_REASONS`; else ``end_turn``)."""
    return STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def anthropic_usage(u) -> dict:
    """A chat ``usage`` object as Messages usage: ``input_tokens`` = ``prompt_tokens`` less the
    cached ones, which are ``cache_read_input_tokens``; ``output_tokens`` = ``completion_tokens``."""
    u = u if isinstance(u, dict) else {}
    details = u.get("prompt_tokens_details")
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = as_int(u.get("prompt_tokens"))
    return {"input_tokens": max(0, prompt - cached), "cache_read_input_tokens": cached,
            "output_tokens": as_int(u.get("completion_tokens"))}


def _arguments(fn: dict, what: str) -> dict:
    args = fn.get("arguments")
    if args is None or args == "":
        return {}
    try:
        obj = orjson.loads(args) if isinstance(args, str) else args
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise malformed("upstream", f"{what} (tool call arguments that are not a JSON object)")
    return obj


@guard_answer
def message_result(result: ChatResult) -> ChatResult:
    """A whole chat completion (a provider's translated :class:`ChatResult`) as a Message: its
    reasoning as a ``thinking`` block, its text as a ``text`` block, each tool call as a
    ``tool_use`` block, ``finish_reason`` → ``stop_reason``, usage as :func:`anthropic_usage`.
    Usage, model and finish reasons of ``result`` are kept for the record."""
    obj = load_object(result.body, "upstream")
    choices = obj.get("choices") if isinstance(obj.get("choices"), list) else []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[dict] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if isinstance(msg.get("content"), str) and msg["content"]:
        content.append({"type": "text", "text": msg["content"]})
    for i, tc in enumerate(opt_list(msg.get("tool_calls"), "upstream", "response (`tool_calls`)")):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise malformed("upstream", f"response (`tool_calls[{i}]` without a function name)")
        content.append({"type": "tool_use", "id": tc.get("id") if isinstance(tc.get("id"), str) else _tool_id(),
                        "name": fn["name"], "input": _arguments(fn, f"response (`tool_calls[{i}]`)")})
    doc = {"id": _message_id(obj.get("id")), "type": "message", "role": "assistant",
           "model": obj.get("model") if isinstance(obj.get("model"), str) else "", "content": content,
           "stop_reason": stop_reason(choice.get("finish_reason")), "stop_sequence": None,
           "usage": anthropic_usage(obj.get("usage"))}
    return ChatResult(orjson.dumps(doc), result.usage, result.response_model, result.finish_reasons)


def _message_id(upstream_id) -> str:
    return f"msg_{upstream_id}" if isinstance(upstream_id, str) and upstream_id else f"msg_{uuid.uuid4().hex[:24]}"


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


# -- stream ---------------------------------------------------------------------------------------
def event(name: str, obj: dict) -> bytes:
    """One Messages API stream event: ``event: {name}\\ndata: {json}\\n\\n``."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class _ToolCall(ArgsScan):
    """One chat tool call on its way to being a ``tool_use`` block: its id and name, the argument
    fragments so far, whether they add up to a whole JSON object or array (``complete``, from
    :class:`~aisix.providers.reencode.ArgsScan`), and the index of its block once that began (None
    while it is held back)."""

    __slots__ = ("args", "id", "index", "name")

    def __init__(self, tool_id: str, name: str):
        super().__init__()
        self.id, self.name = tool_id, name
        self.args: list[str] = []
        self.index: int | None = None

    def feed(self, frag: str) -> None:
        """Add one argument fragment (``complete`` turns True at the bracket that closes the value)."""
        self.args.append(frag)
        self.scan(frag)


class MessagesEncoder(ChunkEncoder):
    """``chat.completion.chunk`` objects in, the Messages API's events out (bytes).

    ``message_start`` before the first output (id, model; usage 0 until the end: chat streams
    report it last); each run of reasoning / text / one tool call's arguments is one content block
    (``content_block_start``, its deltas: ``thinking_delta`` / ``text_delta`` /
    ``input_json_delta``, ``content_block_stop``); at the end (:meth:`done`: ``[DONE]`` or a clean
    close after the finish) ``message_delta`` with the ``stop_reason`` and the usage
    (:func:`anthropic_usage` of the usage chunk) and ``message_stop``. Reading the chunks:
    :class:`~aisix.providers.reencode.ChunkEncoder`.

    Interleaving: Messages blocks are sequential (one open at a time, never reopened), while a chat
    stream may send a tool call's argument fragments after the next call began (parallel calls
    interleaved) or text between them. So a tool block stays open until its arguments are a whole
    JSON value (:class:`_ToolCall`), and what arrives meanwhile (another call, its fragments, text,
    reasoning) is held back in arrival order and sent, each held run as one delta, when the open
    call completes (or at the finish, which closes every block). Calls sent one after another, as
    OpenAI sends them, stream live with no delay; an interleaved call waits for the ones before it.
    Whitespace after a call's complete arguments is dropped; anything else there is a 502."""

    def __init__(self):
        super().__init__()
        self.open: tuple[str, int, _ToolCall | None] | None = None  # the block being streamed: kind, index, call
        self.blocks = 0
        self.held: list = []  # in arrival order: _ToolCall, or [kind, text] runs of reasoning/text
        self.finishing = False

    def begin(self, obj: dict) -> bytes:
        return event("message_start", {"type": "message_start", "message": {
            "id": _message_id(obj.get("id")), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _holding(self) -> bool:
        """Whether new content must wait: an open tool block whose arguments are not whole yet."""
        return self.open is not None and self.open[2] is not None and not self.open[2].complete \
            and not self.finishing

    def _stop(self) -> bytes:
        if self.open is None:
            return b""
        index = self.open[1]
        self.open = None
        return event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _block(self, kind: str, block: dict, call: _ToolCall | None = None) -> bytes:
        out = self._stop()
        self.open = (kind, self.blocks, call)
        self.blocks += 1
        return out + event("content_block_start", {"type": "content_block_start", "index": self.open[1],
                                                   "content_block": block})

    def _delta(self, index: int, delta: dict) -> bytes:
        self.output = True
        return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def _run(self, kind: str, text: str) -> bytes:
        """Reasoning or text: into the open block of its kind, else a new block (held back while a
        tool call is incomplete)."""
        if self._holding():
            last = self.held[-1] if self.held else None
            if isinstance(last, list) and last[0] == kind:
                last[1] += text
            else:
                self.held.append([kind, text])
            return b""
        out = b""
        if not (self.open and self.open[0] == kind):
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
                else {"type": "text", "text": ""}
            out = self._block(kind, block)
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" \
            else {"type": "text_delta", "text": text}
        return out + self._delta(self.open[1], delta)

    def reasoning(self, text: str) -> bytes:
        return self._run("thinking", text)

    def text(self, text: str) -> bytes:
        return self._run("text", text)

    def _start_tool(self, call: _ToolCall) -> bytes:
        """``call``'s block begins, with the arguments it got while held back as one delta."""
        out = self._block("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}, call)
        call.index = self.open[1]
        args = "".join(call.args)
        if args:
            out += self._delta(call.index, {"type": "input_json_delta", "partial_json": args})
        return out

    def _release(self) -> bytes:
        """Close a tool block whose arguments are whole, then send what was held back, in order,
        until it is all out or a tool call in it is incomplete."""
        out = []
        while True:
            if self.open is not None and self.open[2] is not None and (self.open[2].complete or self.finishing):
                out.append(self._stop())
            if not self.held or self._holding():
                return b"".join(out)
            item = self.held.pop(0)
            if isinstance(item, _ToolCall):
                out.append(self._start_tool(item))
            else:
                out.append(self._run(*item))

    def tool_start(self, tool_id: str | None, name: str) -> tuple[bytes, _ToolCall]:
        call = _ToolCall(tool_id or _tool_id(), name)
        if self._holding():
            self.held.append(call)
            return b"", call
        return self._start_tool(call), call

    def tool_args(self, call: _ToolCall, args: str) -> bytes:
        if call.complete:  # its block may be closed: only whitespace may follow a whole JSON value
            if args.strip():
                raise malformed("upstream", "stream event (tool call arguments after a complete JSON value)")
            return b""
        call.feed(args)
        if self.open is None or self.open[2] is not call:
            return b""  # held back: sent when its turn comes
        out = self._delta(call.index, {"type": "input_json_delta", "partial_json": args})
        return out + self._release() if call.complete else out

    def close(self) -> bytes:
        """At the finish: every block closed, what was held back sent first (each as one block)."""
        self.finishing = True
        return self._release() + self._stop()

    def finale(self) -> bytes:
        return event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop_reason(self.finish), "stop_sequence": None},
            "usage": anthropic_usage(self.usage)}) + event("message_stop", {"type": "message_stop"})

    def error_event(self, err: GatewayError) -> bytes:
        """``err`` as the stream's ``error`` event."""
        return event("error", anthropic_error_body(err))
