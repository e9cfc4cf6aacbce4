"""One provider stream, re-encoded for another client API: the glue between the two layers.

A provider's :class:`~aisix.providers.StreamDecoder` turns its upstream's events into
``chat.completion.chunk`` events (the one translation layer every provider has); an encoder
(:class:`~aisix.providers.messages_chat.MessagesEncoder`,
:class:`~aisix.providers.responses_chat.ResponsesEncoder`) turns those chunks into the events of
the API the client speaks. :class:`ReencodingDecoder` chains them and is itself a StreamDecoder,
so the relay (:class:`~aisix.proxy.stream.StreamRelay`) measures and frames it as any other.
"""
from __future__ import annotations

import re

import orjson

from aisix.errors import GatewayError
from aisix.providers.base import ERROR, OTHER, TOKEN, StreamDecoder
from aisix.providers.translate import MALFORMED, malformed
from aisix.sse import SSEEvent, SSEParser

#: What :class:`ArgsScan` looks at in argument fragments: string quotes, escapes, brackets.
_JSON_MARKS = re.compile(r'[\\"{}\[\]]')


class ArgsScan:
    """Whether a tool call's argument fragments, fed one by one (:meth:`scan`), add up to a whole
    JSON object or array yet: ``complete`` turns True at the bracket that closes the value. A
    string-aware bracket count (quotes and backslash escapes as RFC 8259 reads them, an escape cut
    between two fragments too), O(length) over all the fragments; a scalar or nothing never
    completes. The encoders use it to know when no more fragments can come for a call."""

    __slots__ = ("complete", "depth", "esc", "in_str")

    def __init__(self):
        self.depth, self.in_str, self.esc, self.complete = 0, False, False, False

    def scan(self, frag: str) -> None:
        """Read one argument fragment (nothing more is read once ``complete``)."""
        i = 0
        if self.esc and frag:  # the character after a backslash that ended the last fragment
            self.esc, i = False, 1
        while not self.complete and (m := _JSON_MARKS.search(frag, i)) is not None:
            c, i = m.group(), m.end()
            if self.in_str:
                if c == "\\":
                    if i < len(frag):
                        i += 1
                    else:
                        self.esc = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                self.complete = self.depth == 0


class ChunkEncoder:
    """Chat chunks in, another API's SSE events out (bytes): the reading every encoder shares.

    :meth:`chunk` reads choice 0 of each ``chat.completion.chunk`` (a request of these APIs asks
    for one) and calls the subclass's steps: :meth:`begin` before the first output (the chunk's
    ``id``/``model``), :meth:`reasoning` (``reasoning_content``/``reasoning``), :meth:`text`
    (``content``), :meth:`tool_start` (a tool call's first chunk: index, id, name) and
    :meth:`tool_args` (its argument fragments), :meth:`close` (every open block/item, at the finish);
    it keeps ``finish`` (the ``finish_reason``) and ``usage`` (the usage chunk's object).
    :meth:`done` ends the stream with :meth:`finale`. ``output`` is True when the last
    :meth:`chunk` emitted generated output (the first token; the steps set it when they send
    some). A tool call's first chunk without a name is a 502 (malformed)."""

    def __init__(self):
        self.started = self.ended = self.output = False
        self.finish: str | None = None
        self.usage: dict | None = None
        self.model = ""
        self.tools: dict[int, object] = {}  # chat tool call index → the subclass's handle of it

    def chunk(self, obj: dict) -> bytes:
        """One chunk → the events it makes (``b""``: none)."""
        self.output = False
        out = [] if self.started else [self._begin(obj)]
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out.append(self.reasoning(reasoning))
        if isinstance(delta.get("content"), str) and delta["content"]:
            out.append(self.text(delta["content"]))
        for tc in delta.get("tool_calls") or ():
            if isinstance(tc, dict):
                out.append(self._tool(tc))
        if isinstance(choice.get("finish_reason"), str):
            self.finish = choice["finish_reason"]
            out.append(self.close())
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        return b"".join(out)

    def _begin(self, obj: dict) -> bytes:
        self.started = True
        self.model = obj.get("model") if isinstance(obj.get("model"), str) else ""
        return self.begin(obj)

    def _tool(self, tc: dict) -> bytes:
        k = tc.get("index") if isinstance(tc.get("index"), int) else 0
        fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
        out = b""
        if k not in self.tools:
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise malformed("upstream", "stream event (a tool call's first chunk without a name)")
            tid = tc.get("id") if isinstance(tc.get("id"), str) and tc["id"] else None
            out, self.tools[k] = self.tool_start(tid, name)
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out += self.tool_args(self.tools[k], args)
        return out

    def done(self) -> bytes:
        """The chat stream ended (``[DONE]``, or a clean close after the finish): the open block
        closed, then :meth:`finale`; ``b""`` once that went out."""
        if self.ended:
            return b""
        self.ended = True
        return (b"" if self.started else self._begin({})) + self.close() + self.finale()

    # -- the steps an API's encoder defines ------------------------------------------------------------
    def begin(self, obj: dict) -> bytes:
        """The stream's opening events."""
        raise NotImplementedError

    def reasoning(self, text: str) -> bytes:
        raise NotImplementedError

    def text(self, text: str) -> bytes:
        raise NotImplementedError

    def tool_start(self, tool_id: str | None, name: str) -> tuple[bytes, object]:
        """A tool call begins (``tool_id`` None: the upstream gave none): its events and a handle."""
        raise NotImplementedError

    def tool_args(self, handle, args: str) -> bytes:
        raise NotImplementedError

    def close(self) -> bytes:
        """At the finish: close every block or item still open (``b""``: none is)."""
        raise NotImplementedError

    def finale(self) -> bytes:
        """The closing events (stop reason, usage)."""
        raise NotImplementedError

    def error_event(self, err: GatewayError) -> bytes:
        """The event that ends the stream with ``err``."""
        raise NotImplementedError


class ReencodingDecoder(StreamDecoder):
    """``inner`` (a provider's decoder, asked for the usage chunk) re-encoded by ``encoder``.

    Measures come from ``inner`` (usage, finish, done, error, response model); an event is TOKEN
    when the encoder emitted output for it. Comments (keep-alives) pass as they are."""

    def __init__(self, inner: StreamDecoder, encoder: ChunkEncoder):
        super().__init__(True)
        self.token = False  # the encoder emitted output for the event being re-encoded
        self.inner = inner
        self.encoder = encoder
        self.parser = SSEParser()
        self.finish_reasons = inner.finish_reasons

    def _encode(self, data: bytes) -> bytes:
        out = []
        for ev in self.parser.feed(data):
            if ev.data is None:
                out.append(ev.raw)
            elif ev.data == b"[DONE]":
                out.append(self.encoder.done())
            else:
                try:
                    obj = orjson.loads(ev.data)
                except orjson.JSONDecodeError:
                    continue  # not JSON: nothing to translate (a chat client would get it as it is)
                if isinstance(obj, dict):
                    out.append(self.encoder.chunk(obj))
                    self.token = self.token or self.encoder.output
        return b"".join(out)

    def _sync(self) -> None:
        inner = self.inner
        self.usage, self.error, self.done, self.finished = inner.usage, inner.error, inner.done, inner.finished
        self.response_model = inner.response_model

    def _guarded(self, fn) -> bytes | None:
        """``fn()``; an encoder that chokes on a chunk of an unexpected shape ends the stream with
        a 502 (:attr:`error`) rather than raising."""
        try:
            return fn()
        except GatewayError as e:
            self.error = e
        except MALFORMED:
            self.error = malformed("upstream", "stream event")
        self.token = False
        return None

    def feed(self, event: SSEEvent) -> tuple[bytes | None, int]:
        """The inner decoder's event, re-encoded; TOKEN when the encoder emitted output for it."""
        data, kind = self.inner.feed(event)
        self._sync()
        if kind & ERROR or not data:
            return None, kind & ~TOKEN
        self.token = False
        out = self._guarded(lambda: self._encode(data))
        if self.error is not None:
            return None, ERROR
        return out or None, (kind & ~TOKEN) | (TOKEN if self.token else OTHER)

    def end(self) -> bytes | None:
        data = self.inner.end()
        self._sync()
        return self._guarded(lambda: (self._encode(data) if data else b"") + self.encoder.done())

    def error_event(self, err: GatewayError) -> bytes:
        return self.encoder.error_event(err)
