"""What the translating providers (``anthropic``, ``gemini``) share: reading OpenAI request
parts, and building OpenAI response shapes.

Shapes follow the OpenAI API reference: the chat completion object
(https://platform.openai.com/docs/api-reference/chat/object), the chunk object
(https://platform.openai.com/docs/api-reference/chat-streaming/streaming) and the usage
object with ``prompt_tokens_details.cached_tokens`` and
``completion_tokens_details.reasoning_tokens``.
"""
from __future__ import annotations

import time

import orjson

from ..errors import GatewayError, invalid_request, upstream_unreachable
from .base import StreamDecoder, Usage

DONE = b"data: [DONE]\n\n"


def sse(obj) -> bytes:
    """One SSE event as OpenAI frames it: ``data: {json}\\n\\n``."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def load_object(body: bytes, provider: str) -> dict:
    """A 2xx upstream body as a JSON object. Raises GatewayError 502 otherwise."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise upstream_unreachable(f"upstream {provider} sent a body that is not JSON") from e
    if not isinstance(obj, dict):
        raise upstream_unreachable(f"upstream {provider} sent an unexpected body")
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
        out.append(fn)
    return out


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
            return sse(obj) + DONE
        return DONE

    def end(self) -> bytes | None:
        return None if self.done else self.tail()

    def stream_error(self, message: str, etype: str, code: str | None) -> None:
        """An error the upstream sent mid-stream: the proxy ends the stream with it (502)."""
        self.error = GatewayError(502, message or f"upstream {self.provider} reported an error mid-stream",
                                  etype, code)
