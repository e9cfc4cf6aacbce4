"""What the translating providers (``anthropic``, ``gemini``) share: reading OpenAI request
parts, and building OpenAI response shapes.

Shapes follow the OpenAI API reference: the chat completion object
(https://platform.openai.com/docs/api-reference/chat/object), the chunk object
(https://platform.openai.com/docs/api-reference/chat-streaming/streaming) and the usage
object with ``prompt_tokens_details.cached_tokens`` and
``completion_tokens_details.reasoning_tokens``.

Malformed input never crashes a translator. Each field read is type-checked where it enters: a
client request of the wrong shape is a 400 naming the field (``param``); an upstream body or
stream event whose *content* has the wrong type (``content`` not an array, a ``text`` that is not
a string, a tool call without a name) is a 502 ``upstream_malformed_response`` ("upstream X sent a
malformed ..."; mid-stream it ends the stream as an error event), while *metadata* of the wrong
type (ids, indexes, ``stop_reason``, usage) is ignored. A narrow last-resort guard per entry point
(:data:`MALFORMED`) turns anything that still slips through into the same 400 / 502. Error
bodies keep the upstream's status; their ``message``/``code`` are strings, JSON text when the
upstream sent something else (:func:`json_text`), never a Python repr.
"""
from __future__ import annotations

import functools
import time
import uuid

import orjson

from aisix.errors import GatewayError, error_type_for, invalid_request, upstream_malformed
from aisix.providers.base import DONE, ERROR, FINISH, OTHER, TOKEN, StreamDecoder, Usage
from aisix.providers.errors import error_envelope, json_text, status_of_error_event  # noqa: F401 - error_envelope re-exported
from aisix.sse import SSEEvent

DONE_EVENT = b"data: [DONE]\n\n"


def sse(obj) -> bytes:
    """One SSE event as OpenAI frames it: ``data: {json}\\n\\n``."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


#: What translation code raises on data of a shape it did not expect. Inputs are validated where
#: they enter (each field read is type-checked); the guards below turn anything that still slips
#: through into a GatewayError, so no other exception leaves a translator.
MALFORMED = (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError)


def malformed(provider: str, what: str) -> GatewayError:
    """502: the upstream's 2xx body or stream event does not have the documented shape."""
    return upstream_malformed(f"upstream {provider} sent a malformed {what}")


def guard_request(fn):
    """For ``chat_request``/``embeddings_request``: a client request that trips the translation
    (a shape no boundary check caught) is a 400, never a 500."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except MALFORMED:
            raise invalid_request(f"the request cannot be translated for {self.name}: a field has an "
                                  "unexpected shape or is nested too deeply", "invalid_request") from None
    return wrapper


def guard_response(fn):
    """For ``chat_response``/``embeddings_response``: a malformed upstream body is a 502."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except MALFORMED:
            raise malformed(self.name, "response") from None
    return wrapper


def guard_answer(fn):
    """For the entry translators of a whole answer (a function of the upstream's body): a body
    that trips the translation is a 502, as :func:`guard_response` makes it for a provider."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MALFORMED:
            raise malformed("upstream", "response") from None
    return wrapper


def shown(v, limit: int = 64) -> str:
    """A client's value quoted in an error message: a string as it is, anything else as JSON,
    cut to ``limit`` characters (never a Python repr)."""
    text = json_text(v) if v is not None else "null"
    return text if len(text) <= limit else text[:limit] + "..."


def guard_error(fn):
    """For ``error_from_response``: whatever the error body holds, the client gets the upstream's
    status with a generic message rather than a crash."""
    @functools.wraps(fn)
    def wrapper(self, status, headers, body):
        try:
            return fn(self, status, headers, body)
        except MALFORMED:
            return GatewayError(status, f"upstream {self.name} answered HTTP {status}", error_type_for(status))
    return wrapper


def opt_str(v, provider: str, what: str) -> str:
    """An optional string field of an upstream body (missing/null → ``""``); 502 for another type."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    raise malformed(provider, what)


def opt_dict(v, provider: str, what: str) -> dict:
    """An optional object field of an upstream body (missing/null → ``{}``); 502 for another type."""
    if v is None:
        return {}
    if isinstance(v, dict):
        return v
    raise malformed(provider, what)


def opt_list(v, provider: str, what: str) -> list:
    """An optional array field of an upstream body (missing/null → ``[]``); 502 for another type."""
    if v is None:
        return []
    if isinstance(v, list):
        return v
    raise malformed(provider, what)


def str_or(v, default: str) -> str:
    """A metadata string (an id, a model name) if it is one, else ``default``."""
    return v if isinstance(v, str) and v else default


def index_of(v, default: int) -> int:
    """A choice / content-block index if it is a non-negative integer, else ``default``."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def load_object(body: bytes, provider: str) -> dict:
    """A 2xx upstream body as a JSON object. Raises GatewayError 502 otherwise."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise upstream_malformed(f"upstream {provider} sent a body that is not JSON") from e
    if not isinstance(obj, dict):
        raise upstream_malformed(f"upstream {provider} sent an unexpected body")
    return obj


def as_int(v) -> int:
    """A token count from an upstream field (missing, null or malformed → 0)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def usage_object(u: Usage, cached: int = 0, reasoning: int = 0) -> dict:
    """OpenAI's ``usage``; the details objects appear only when they carry a count."""
    obj: dict = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                 "total_tokens": u.total_tokens}
    if cached:
        obj["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning:
        obj["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return obj


def text_of(content, where: str) -> str:
    """The text of a message ``content``: a string, or the ``text`` parts of a list joined.
    Raises 400 for a part that is not text (``where`` names the field)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise invalid_request(f"`{where}` may only hold text parts for this provider", "invalid_content", where)
        return "".join(out)
    raise invalid_request(f"`{where}` must be a string or an array of parts", "invalid_type", where)


def data_url(url: str) -> tuple[str, str] | None:
    """``data:{mime};base64,{data}`` → ``(mime, data)``; anything else → None."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head[: -len(";base64")] or "application/octet-stream", data


def image_url_of(part: dict, where: str) -> str:
    """The URL of an OpenAI ``image_url`` part (``{"image_url": {"url": ...}}`` or a bare string)."""
    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str) or not url:
        raise invalid_request(f"`{where}.image_url.url` must be a string", "invalid_type", where)
    return url


def tool_arguments(args, where: str) -> dict:
    """An OpenAI tool call's ``arguments`` (a JSON string) as the object providers want. 400 if not an object."""
    if isinstance(args, dict):
        return args
    if args is None or args == "":
        return {}
    try:
        obj = orjson.loads(args)
    except (orjson.JSONDecodeError, TypeError):
        raise invalid_request(f"`{where}` is not valid JSON", "invalid_tool_arguments", where) from None
    if not isinstance(obj, dict):
        raise invalid_request(f"`{where}` must be a JSON object", "invalid_tool_arguments", where)
    return obj


def function_tools(tools, where: str = "tools") -> list[dict]:
    """OpenAI ``tools`` → their ``function`` objects. 400 for a tool of another type."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid_request("`tools` must be an array", "invalid_type", where)
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid_request(f"`{where}[{i}]` must be a function tool with a name", "invalid_tool", where)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise invalid_request(f"`{where}[{i}].function.description` must be a string", "invalid_type",
                                  f"{where}[{i}].function.description")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise invalid_request(f"`{where}[{i}].function.parameters` must be a JSON Schema object", "invalid_type",
                                  f"{where}[{i}].function.parameters")
        out.append(fn)
    return out


def message_of(m, where: str) -> dict:
    """One entry of ``messages``: it must be an object (400 naming it otherwise)."""
    if not isinstance(m, dict):
        raise invalid_request(f"`{where}` must be an object", "invalid_type", where)
    return m


def tool_calls_of(m: dict, where: str) -> list:
    """An assistant message's ``tool_calls`` (missing/null → ``[]``); 400 if it is not an array."""
    calls = m.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise invalid_request(f"`{where}.tool_calls` must be an array", "invalid_type", f"{where}.tool_calls")
    return calls


def tool_choice_name(choice) -> str | None:
    """The function name of a ``{"type": "function", "function": {"name": ...}}`` tool choice, else None."""
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def stop_list(stop) -> list[str] | None:
    """OpenAI ``stop`` (a string or an array of strings) as a list; None when absent."""
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise invalid_request("`stop` must be a string or an array of strings", "invalid_type", "stop")


def max_tokens_of(body: dict) -> int | None:
    """``max_completion_tokens`` (current) or ``max_tokens`` (deprecated), whichever is set."""
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise invalid_request(f"`{name}` must be a positive integer", "invalid_type", name)
            return v
    return None


def chat_completion(cid: str, model: str, choices: list[dict], usage: dict | None) -> bytes:
    """A whole ``chat.completion`` object as bytes."""
    obj = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return orjson.dumps(obj)


def assistant_message(text: str | None, tool_calls: list[dict], reasoning: str | None) -> dict:
    """The ``message`` of a choice: ``content`` null when there is no text (e.g. tool calls only)."""
    msg: dict = {"role": "assistant", "content": text if text or not tool_calls else None, "refusal": None}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


class ChunkDecoder(StreamDecoder):
    """A decoder that writes its own OpenAI chunks (rather than relaying the upstream's bytes).

    Subclasses set ``id``/``response_model`` from the upstream and call :meth:`chunk`;
    ``usage_obj`` is the OpenAI ``usage`` the client gets in the final chunk if it asked.
    """

    provider = ""

    def __init__(self, include_usage: bool):
        super().__init__(include_usage)
        self.token = False  # the event on_event is translating carried output
        self.id = ""
        self.created = int(time.time())
        self.usage_obj: dict | None = None

    def chunk(self, choices: list[dict]) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.response_model or "", "choices": choices}
        if self.include_usage:
            obj["usage"] = None  # as OpenAI does: every chunk but the last carries a null usage
        return sse(obj)

    @staticmethod
    def choice(index: int, delta: dict, finish: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def tail(self) -> bytes:
        """The end of the stream: the usage chunk (``choices: []``) if asked for, then ``[DONE]``."""
        self.done = True
        if self.include_usage and self.usage_obj is not None:
            obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.response_model or "", "choices": [], "usage": self.usage_obj}
            return sse(obj) + DONE_EVENT
        return DONE_EVENT

    def end(self) -> bytes | None:
        return None if self.done else self.tail()

    def feed(self, event: SSEEvent) -> tuple[bytes | None, int]:
        """Parse the event's JSON and hand the object to :meth:`on_event`. A non-JSON or
        non-object ``data`` is skipped; an event of the wrong shape ends the stream with a 502
        (:attr:`error`), as does any translation failure, so nothing else ever escapes."""
        if event.data is None:
            return None, OTHER
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return None, OTHER
        if not isinstance(obj, dict):
            return None, OTHER
        self.token = False
        finished, done = self.finished, self.done
        try:
            out = self.on_event(obj, event.event)
        except GatewayError as e:
            self.error = e
        except MALFORMED:
            self.error = malformed(self.provider, "stream event")
        if self.error is not None:
            return None, ERROR
        return out, ((TOKEN if self.token else OTHER) | (FINISH if self.finished and not finished else OTHER)
                     | (DONE if self.done and not done else OTHER))

    def on_event(self, obj: dict, name: str | None) -> bytes | None:
        """One upstream event (a JSON object; ``name`` is its SSE ``event:`` field) → client bytes.
        Sets ``token`` when the event carried output, ``finished``/``done`` when it finished or
        ended the stream, and reports an error event with :meth:`stream_error`."""
        raise NotImplementedError

    def stream_error(self, message: str, etype: str, code: str | None) -> None:
        """An error the upstream sent in the stream: the proxy answers with the status it stands for
        when nothing was sent yet, else ends the stream with it (measured 502)."""
        self.error = GatewayError(status_of_error_event({"type": etype, "code": code}),
                                  message or f"upstream {self.provider} reported an error mid-stream", etype, code)
        self.error.upstream_status = 200
