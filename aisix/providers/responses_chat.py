"""The OpenAI Responses API in front of chat completions, stateless subset: pure functions,
events in, events out (https://platform.openai.com/docs/api-reference/responses).

A client of ``POST /v1/responses`` whose model is on a provider other than ``openai`` gets its
request as a chat completion (:func:`chat_body`), answered as a ``response`` object
(:func:`response_result`) or, streamed, as the Responses event sequence (:class:`ResponsesEncoder`,
fed with ``chat.completion.chunk`` objects,
https://platform.openai.com/docs/api-reference/responses-streaming).

Request: ``instructions`` → a system message; ``input`` as a string (one user message) or items:
messages (``input_text``/``output_text`` parts → text, ``input_image`` with an ``image_url`` →
an ``image_url`` part), ``function_call`` → the assistant's ``tool_calls``,
``function_call_output`` → a ``tool`` message, ``reasoning`` items dropped; function ``tools``,
``tool_choice``, ``parallel_tool_calls``; ``text.format`` (``json_schema``, ``json_object``) →
``response_format``; ``max_output_tokens`` → ``max_tokens``; ``reasoning.effort`` →
``reasoning_effort``; ``temperature``, ``top_p``, ``user``. Refused (400 naming the feature:
they need state the gateway does not keep, or tools only OpenAI runs): ``previous_response_id``,
``conversation``, ``store: true``, ``background: true``, ``prompt`` (stored prompts),
``item_reference`` items, built-in tools (``web_search``, ``file_search``, …), file inputs.
"""
from __future__ import annotations

import time
import uuid

import orjson

from aisix.errors import GatewayError, invalid_request
from aisix.providers.base import ChatResult
from aisix.providers.reencode import ArgsScan, ChunkEncoder
from aisix.providers.translate import as_int, guard_answer, load_object, malformed, opt_list, shown

#: Request fields that need what only a stateful upstream keeps, and what to call them.
STATEFUL = (("previous_response_id", "previous_response_id (conversation state kept by the upstream)"),
            ("conversation", "conversation (conversation state kept by the upstream)"),
            ("prompt", "prompt (prompt templates stored by the upstream)"))

#: chat ``finish_reason`` → the Responses ``incomplete_details.reason`` (others complete).
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _unsupported(feature: str, param: str) -> GatewayError:
    return invalid_request(f"{feature} is not supported for this model: its provider has no Responses API, and "
                           "aisix translates only the stateless subset (see the README)", "unsupported_parameter", param)


def refuse_stateful(body: dict) -> None:
    """400 ``unsupported_parameter`` naming the first stateful feature ``body`` asks for (what a
    translation to chat completions cannot serve)."""
    for name, feature in STATEFUL:
        if body.get(name) is not None:
            raise _unsupported(feature, name)
    if body.get("store") is True:
        raise _unsupported("store: true (responses stored by the upstream)", "store")
    if body.get("background") is True:
        raise _unsupported("background: true (responses run and stored by the upstream)", "background")


# -- request ----------------------------------------------------------------------------------------
def _parts(content, where: str) -> str | list[dict]:
    """A message's content: a string as it is; parts → the text (text only) or chat parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"`{where}` must be a string or an array of content parts", "invalid_type", where)
    parts = []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise invalid_request(f"`{w}.text` must be a string", "invalid_type", w)
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"],
                                                             **({"detail": part["detail"]} if part.get("detail") else {})}})
        elif kind in ("input_image", "input_file"):
            raise _unsupported(f"`{w}`: {kind} by file_id or file_data (files stored by the upstream)", w)
        else:
            raise invalid_request(f"`{w}`: content part type `{shown(kind)}` is not supported", "unsupported_content", w)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool_output(output, where: str) -> str:
    if isinstance(output, str):
        return output
    text = _parts(output, where)
    if not isinstance(text, str):
        raise invalid_request(f"`{where}`: only text tool outputs can be translated", "unsupported_content", where)
    return text


def _messages(items, where: str = "input") -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise invalid_request("`input` must be a string or a non-empty array of input items", "invalid_type", where)
    out: list[dict] = []
    for i, item in enumerate(items):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise invalid_request(f"`{w}` must be an object", "invalid_type", w)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid_request(f"`{w}.role` `{shown(role)}` is not supported", "invalid_role", f"{w}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _parts(item.get("content"), f"{w}.content")})
        elif kind == "function_call":
            name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "")
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(args, str):
                raise invalid_request(f"`{w}`: a function_call needs call_id, name and arguments (strings)",
                                      "invalid_function_call", w)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and isinstance(last.get("content"), (str, type(None))):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise invalid_request(f"`{w}.call_id` must be a string", "invalid_type", f"{w}.call_id")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _tool_output(item.get("output"), f"{w}.output")})
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: no chat field takes it back
        elif kind == "item_reference":
            raise _unsupported(f"`{w}`: item_reference (items stored by the upstream)", w)
        else:
            raise _unsupported(f"`{w}`: input item type `{shown(kind)}` (a built-in tool's call)", w)
    return out


def _tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise invalid_request("`tools` must be an array", "invalid_type", "tools")
    out = []
    for i, t in enumerate(tools):
        w = f"tools[{i}]"
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise _unsupported(f"`{w}`: built-in tool `{shown(kind)}` (run by OpenAI)", w)
        if not isinstance(t.get("name"), str):
            raise invalid_request(f"`{w}.name` must be a string", "invalid_type", f"{w}.name")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(tc):
    if tc is None or tc in ("auto", "none", "required"):
        return tc
    if isinstance(tc, dict) and tc.get("type") == "function" and isinstance(tc.get("name"), str):
        return {"type": "function", "function": {"name": tc["name"]}}
    raise invalid_request("`tool_choice` must be auto, none, required or {type: function, name}", "invalid_tool_choice",
                          "tool_choice")


def _response_format(text) -> dict | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        js = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": js}
    raise invalid_request("`text.format` must be text, json_object or json_schema with a schema", "invalid_type",
                          "text.format")


def chat_body(body: dict, max_tokens_field: str = "max_tokens") -> dict:
    """The chat completion body for a Responses API ``body`` (see the module's mapping). Raises
    400 for a stateful feature (:func:`refuse_stateful`) or what chat cannot carry."""
    refuse_stateful(body)
    messages = _messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid_request("`instructions` must be a string", "invalid_type", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    out: dict = {"model": body.get("model"), "messages": messages}
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if (tc := _tool_choice(body.get("tool_choice"))) is not None:
        out["tool_choice"] = tc
    if isinstance(body.get("parallel_tool_calls"), bool):
        out["parallel_tool_calls"] = body["parallel_tool_calls"]
    if (rf := _response_format(body.get("text"))) is not None:
        out["response_format"] = rf
    mt = body.get("max_output_tokens")
    if mt is not None:
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise invalid_request("`max_output_tokens` must be a positive integer", "invalid_type", "max_output_tokens")
        out[max_tokens_field] = mt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = reasoning["effort"]
    for name in ("temperature", "top_p", "user"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stream") is True:
        out["stream"] = True
    return out


# -- response ---------------------------------------------------------------------------------------
def responses_usage(u) -> dict | None:
    """A chat ``usage`` object in the Responses shape (``input_tokens``, ``output_tokens``,
    ``total_tokens`` and their details); None when there is none."""
    if not isinstance(u, dict):
        return None
    pd, cd = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    p, c = as_int(u.get("prompt_tokens")), as_int(u.get("completion_tokens"))
    return {"input_tokens": p,
            "input_tokens_details": {"cached_tokens": as_int(pd.get("cached_tokens")) if isinstance(pd, dict) else 0},
            "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": as_int(cd.get("reasoning_tokens")) if isinstance(cd, dict) else 0},
            "total_tokens": as_int(u.get("total_tokens")) or p + c}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseShape:
    """The ``response`` object's fields that echo the request (one per request)."""

    def __init__(self, body: dict):
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.body = body

    def object(self, model: str, status: str, output: list, usage: dict | None, finish: str | None = None) -> dict:
        """The ``response`` object (``status``: in_progress, completed, incomplete)."""
        b = self.body
        reasoning = b.get("reasoning") if isinstance(b.get("reasoning"), dict) else {}
        reason = INCOMPLETE.get(finish) if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "background": False, "error": None, "incomplete_details": {"reason": reason} if reason else None,
                "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
                "model": model, "output": output, "parallel_tool_calls": b.get("parallel_tool_calls", True),
                "previous_response_id": None,
                "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
                "store": False, "temperature": b.get("temperature", 1.0),
                "text": b.get("text") if isinstance(b.get("text"), dict) else {"format": {"type": "text"}},
                "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [],
                "top_p": b.get("top_p", 1.0), "truncation": "disabled", "usage": usage, "user": b.get("user"),
                "metadata": b.get("metadata") if isinstance(b.get("metadata"), dict) else {}}


def status_of(finish) -> str:
    """``completed``, or ``incomplete`` for a finish that cut the output (:data:`INCOMPLETE`)."""
    return "incomplete" if finish in INCOMPLETE else "completed"


def _message_item(text: str, status: str = "completed", iid: str | None = None) -> dict:
    return {"id": iid or _id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
            status == "completed" else []}


def _reasoning_item(text: str, iid: str | None = None) -> dict:
    return {"id": iid or _id("rs"), "type": "reasoning",
            "summary": [{"type": "summary_text", "text": text}] if text else []}


def _call_item(call_id: str, name: str, args: str, status: str = "completed", iid: str | None = None) -> dict:
    return {"id": iid or _id("fc"), "type": "function_call", "status": status, "arguments": args,
            "call_id": call_id, "name": name}


@guard_answer
def response_result(result: ChatResult, body: dict) -> ChatResult:
    """A whole chat completion (a provider's :class:`ChatResult`) as a ``response`` object:
    reasoning → a ``reasoning`` item (its text as a summary), text → a ``message`` item, each
    tool call → a ``function_call`` item; usage as :func:`responses_usage`."""
    obj = load_object(result.body, "upstream")
    choices = obj.get("choices") if isinstance(obj.get("choices"), list) else []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    output = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        output.append(_reasoning_item(reasoning))
    if isinstance(msg.get("content"), str) and msg["content"]:
        output.append(_message_item(msg["content"]))
    for i, tc in enumerate(opt_list(msg.get("tool_calls"), "upstream", "response (`tool_calls`)")):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise malformed("upstream", f"response (`tool_calls[{i}]` without a function name)")
        args = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
        output.append(_call_item(tc.get("id") if isinstance(tc.get("id"), str) else _id("call"), fn["name"], args))
    finish = choice.get("finish_reason")
    model = obj.get("model") if isinstance(obj.get("model"), str) else ""
    doc = ResponseShape(body).object(model, status_of(finish), output, responses_usage(obj.get("usage")), finish)
    return ChatResult(orjson.dumps(doc), result.usage, result.response_model, result.finish_reasons)


# -- stream ---------------------------------------------------------------------------------------
def responses_error_event(err: GatewayError, sequence_number: int = 0) -> bytes:
    """``err`` as the Responses stream's ``error`` event (``type``, ``code``, ``message``, ``param``)."""
    doc = {"type": "error", "code": err.code or err.type, "message": err.message, "param": err.param,
           "sequence_number": sequence_number}
    return b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"


class _Item:
    """One output item being streamed: its kind (``message``, ``reasoning``, ``function_call``),
    id, output index, text so far (a call's arguments: ``parts``, joined by :meth:`text`), whether
    its ``.done`` events went out (``done``), and for a call the scan that tells when its
    arguments are whole (``scan``, :class:`~aisix.providers.reencode.ArgsScan`)."""

    __slots__ = ("call_id", "done", "id", "index", "kind", "name", "parts", "scan")

    def __init__(self, kind: str, index: int, call_id: str = "", name: str = ""):
        self.kind, self.index, self.call_id, self.name, self.done = kind, index, call_id, name, False
        self.parts: list[str] = []
        self.scan = ArgsScan() if kind == "function_call" else None
        self.id = _id({"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind])

    def text(self) -> str:
        """The text or arguments so far (the parts joined once, kept joined)."""
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def item(self, status: str) -> dict:
        if self.kind == "message":
            return _message_item(self.text(), status, self.id)
        if self.kind == "reasoning":
            return _reasoning_item(self.text() if status == "completed" else "", self.id)
        return _call_item(self.call_id, self.name, self.text() if status == "completed" else "", status, self.id)


class ResponsesEncoder(ChunkEncoder):
    """``chat.completion.chunk`` objects in, the Responses API's events out (bytes).

    ``response.created`` and ``response.in_progress`` first; each run of reasoning or text, and
    each tool call, is one output item, numbered (``output_index``) in the order it began:
    ``response.output_item.added``, then for a message ``response.content_part.added``,
    ``response.output_text.delta``…, ``response.output_text.done``, ``response.content_part.done``;
    for reasoning ``response.reasoning_summary_part.added``,
    ``response.reasoning_summary_text.delta``…, ``.done``, ``response.reasoning_summary_part.done``;
    for a tool call ``response.function_call_arguments.delta``…, ``.done``; then
    ``response.output_item.done``. At the end (:meth:`done`) ``response.completed``
    (``response.incomplete`` when the output was cut) with every item and the usage. Each event
    carries its ``sequence_number``. Reading the chunks:
    :class:`~aisix.providers.reencode.ChunkEncoder`.

    Interleaving: a chat stream may send a tool call's argument fragments after the next call
    began (parallel calls interleaved) or text between them. Every delta names its item, so each
    goes out as it arrives, to its own item; what waits is only an item's closing: a tool call's
    item stays open until its arguments are a whole JSON value (then its ``.done`` events carry
    them all) or the finish, and a text or reasoning run closes when another item begins (a call's
    fragments don't end it) or at the finish, which closes every open item in output order. So no
    delta follows its item's ``.done``. Whitespace after a call's complete arguments is dropped;
    anything else there is a 502."""

    def __init__(self, body: dict):
        super().__init__()
        self.shape = ResponseShape(body)
        self.seq = 0
        self.items: list[_Item] = []
        self.run: _Item | None = None  # the open reasoning or message item
        self.calls_open = 0  # function_call items not done yet

    def _event(self, kind: str, **fields) -> bytes:
        doc = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"

    def _response(self, status: str) -> dict:
        output = [it.item("completed") for it in self.items] if status != "in_progress" else []
        usage = responses_usage(self.usage) if status != "in_progress" else None
        return self.shape.object(self.model, status, output, usage, self.finish)

    def begin(self, obj: dict) -> bytes:
        resp = self._response("in_progress")
        return self._event("response.created", response=resp) + self._event("response.in_progress", response=resp)

    def _close(self, it: _Item) -> bytes:
        """``it``'s closing events (its whole text or arguments)."""
        it.done = True
        ids, text = {"item_id": it.id, "output_index": it.index}, it.text()
        if it.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out = (self._event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[])
                   + self._event("response.content_part.done", **ids, content_index=0, part=part))
        elif it.kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            out = (self._event("response.reasoning_summary_text.done", **ids, summary_index=0, text=text)
                   + self._event("response.reasoning_summary_part.done", **ids, summary_index=0, part=part))
        else:
            self.calls_open -= 1
            out = self._event("response.function_call_arguments.done", **ids, name=it.name, arguments=text)
        return out + self._event("response.output_item.done", output_index=it.index, item=it.item("completed"))

    def _end_run(self) -> bytes:
        it, self.run = self.run, None
        return b"" if it is None else self._close(it)

    def close(self) -> bytes:
        """At the finish: every item still open closed, in output order."""
        out = self._end_run()
        if self.calls_open:
            out += b"".join(self._close(it) for it in self.items if not it.done)
        return out

    def _add(self, it: _Item) -> bytes:
        """The open run closed, then ``it`` added (its ``.added`` events)."""
        out = self._end_run()
        self.items.append(it)
        out += self._event("response.output_item.added", output_index=it.index, item=it.item("in_progress"))
        ids = {"item_id": it.id, "output_index": it.index}
        if it.kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event("response.content_part.added", **ids, content_index=0, part=part)
        elif it.kind == "reasoning":
            out += self._event("response.reasoning_summary_part.added", **ids, summary_index=0,
                               part={"type": "summary_text", "text": ""})
        return out

    def _run(self, kind: str) -> tuple[bytes, _Item]:
        if self.run is not None and self.run.kind == kind:
            return b"", self.run
        it = _Item(kind, len(self.items))
        out = self._add(it)
        self.run = it
        return out, it

    def reasoning(self, text: str) -> bytes:
        out, it = self._run("reasoning")
        it.parts.append(text)
        self.output = True
        return out + self._event("response.reasoning_summary_text.delta", item_id=it.id, output_index=it.index,
                                 summary_index=0, delta=text)

    def text(self, text: str) -> bytes:
        out, it = self._run("message")
        it.parts.append(text)
        self.output = True
        return out + self._event("response.output_text.delta", item_id=it.id, output_index=it.index,
                                 content_index=0, delta=text, logprobs=[])

    def tool_start(self, tool_id: str | None, name: str) -> tuple[bytes, _Item]:
        it = _Item("function_call", len(self.items), tool_id or _id("call"), name)
        self.calls_open += 1
        return self._add(it), it

    def tool_args(self, it: _Item, args: str) -> bytes:
        if it.done:  # closed (whole arguments, or the finish): only whitespace may follow
            if args.strip():
                raise malformed("upstream", "stream event (tool call arguments after a complete JSON value "
                                            "or the finish)")
            return b""
        it.parts.append(args)
        it.scan.scan(args)
        self.output = True
        out = self._event("response.function_call_arguments.delta", item_id=it.id, output_index=it.index,
                          delta=args)
        return out + self._close(it) if it.scan.complete else out

    def finale(self) -> bytes:
        status = status_of(self.finish)
        return self._event(f"response.{status}", response=self._response(status))

    def error_event(self, err: GatewayError) -> bytes:
        """``err`` as the stream's ``error`` event."""
        return responses_error_event(err, self.seq)
