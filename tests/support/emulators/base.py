"""What the provider emulators share: an aiohttp app on 127.0.0.1 (a free port) running on its
own thread and loop (so a sync client in the test's thread never blocks it), a queue of scripted
replies, and a record of every request received.

    with AnthropicEmulator() as emu:
        emu.reply(text=["Hel", "lo"], usage={"input_tokens": 9, "output_tokens": 2})
        ... call the gateway ...
        emu.requests[-1].json["max_tokens"]
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.services import HOST, free_port


@dataclass
class Reply:
    """What the emulator answers to one request (provider-native names where it matters).

    ``text``: the text, one stream delta per item (joined when not streamed); ``thinking``:
    reasoning deltas; ``tool_calls``: ``(name, args)`` pairs; ``usage``: the provider's own usage
    fields (overrides the defaults); ``stop``: the provider's stop/finish reason (default:
    the natural one); ``error``: ``(status, type_or_status, message)`` answered instead, with
    ``headers`` added; ``error_after``: in a stream, send the provider's error event after this
    many deltas and end; ``drop_after``: abort the connection after this many deltas;
    ``head_delay``: seconds before the status line; ``chunk_delay``: seconds between events;
    ``interleave``: the chat stream sends every tool call's opening chunk, the text, then the calls'
    argument fragments round robin (as servers streaming parallel calls at once do).
    """

    text: list[str] = field(default_factory=lambda: ["Hello", " there", "!"])
    thinking: list[str] = field(default_factory=list)
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    stop: str | None = None
    error: tuple[int, str, str] | None = None
    headers: dict = field(default_factory=dict)
    error_after: int | None = None
    drop_after: int | None = None
    head_delay: float = 0.0
    chunk_delay: float = 0.0
    model: str | None = None
    signature: str | None = None  # gemini: a thoughtSignature on the first functionCall part
    interleave: bool = False  # openai chat stream: parallel calls interleaved (see OpenAIEmulator.chat)


@dataclass
class Recorded:
    """One request the emulator received."""

    method: str
    path: str
    query: dict
    headers: dict  # names lower-cased
    raw: bytes
    json: object


class Emulator:
    """Base: subclasses add routes in :meth:`routes` and set ``prefix`` (the API base path)."""

    prefix = ""

    def __init__(self, api_key: str = "test-upstream-key"):
        self.api_key = api_key
        self.port = free_port()
        self.replies: deque[Reply] = deque()
        self.requests: list[Recorded] = []
        self.sent_usage: list[dict] = []  # the usage each answer reported (its final value), in order
        self.sent: list[bytearray] = []  # the body bytes of each 2xx answer, as written (streams: so far)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}{self.prefix}"

    def reply(self, **kw) -> Reply:
        """Queue the answer to the next request (requests past the queue get the default :class:`Reply`)."""
        r = Reply(**kw)
        self.replies.append(r)
        return r

    def next_reply(self) -> Reply:
        return self.replies.popleft() if self.replies else Reply()

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def record(self, request: web.Request) -> Recorded:
        import json
        raw = await request.read()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        rec = Recorded(request.method, request.path, dict(request.query),
                       {k.lower(): v for k, v in request.headers.items()}, raw, doc)
        self.requests.append(rec)
        return rec

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Emulator":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


async def pause(r: Reply) -> None:
    if r.chunk_delay:
        await asyncio.sleep(r.chunk_delay)


def split_json(s: str, parts: int = 3) -> list[str]:
    """A JSON text cut into ``parts`` fragments (as providers stream tool arguments)."""
    step = max(1, -(-len(s) // parts))
    return [s[i:i + step] for i in range(0, len(s), step)]
