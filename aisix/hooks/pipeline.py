"""The hook pipeline around each provider call.

Order (see the README): authentication → ``pre_call`` of each hook in order (validate, rate
limit; a hook rejects by raising :class:`~aisix.errors.GatewayError`) → the provider call →
``post_call`` of every hook whose ``pre_call`` passed, on every way out (success, upstream
error, timeout, client disconnect, cancellation), with what the call got. When routing moves on
to a fallback model, ``enter_fallback`` of every hook runs before its first attempt (a hook
refuses the fallback by raising, e.g. a 429 for the fallback's own ``rate_limit``: the proxy then
skips it) and ``leave_fallback`` after its last, on every way out.
Hooks are synchronous: O(1) work, no lock ever held across an await. A ``pre_call`` that needs
I/O (the Redis rate limiter's one round trip) returns an awaitable, which the pipeline awaits
before the next hook; ``post_call`` never awaits: I/O it needs is handed to a background task.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable

from aisix.config.resources import ApiKey, Model
from aisix.errors import GatewayError
from aisix.telemetry.records import Attempt, RequestRecord


@dataclass(slots=True, eq=False)
class Call:
    """One proxied call as the hooks see it.

    ``record`` holds what is measured (usage in tokens once known, status); hooks add response
    headers to ``response_headers`` and keep their own per-call state in ``state`` (each hook
    under its own key; nothing else is passed through it). ``request_bytes`` is the size of the
    request body (bytes; the rate limiter's prompt estimate).
    ``model`` is the alias the client asked for (limits count against it); ``target`` the
    deployment the current attempt goes to. ``estimated_completion_tokens`` is the gateway's own count of completion tokens when an
    upstream stream ended without usage (one per data event from the first token up to the
    one that carries the finish_reason).
    """

    key: ApiKey
    model: Model
    record: RequestRecord
    stream: bool = False
    request_bytes: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    estimated_completion_tokens: int = 0
    target: Model | None = None  # the deployment the current attempt goes to (a one-upstream Model)
    upstream_called: bool = False  # the current attempt reached the upstream call
    upstream_status: int = 0  # what the current attempt's upstream answered (its HTTP status)
    attempts: int = 0  # upstream attempts made so far
    stream_error: GatewayError | None = None  # the current attempt's stream broke after its 200
    attempt: Attempt | None = None  # the current attempt's record (its span id goes upstream)
    masks: tuple = ()  # the current attempt's upstream key and its mask (bytes): never relayed back


class Hook:
    """Base class: override what you need."""

    def pre_call(self, call: Call) -> Awaitable[None] | None:
        """Before the provider call. Raise GatewayError (here or from the awaitable returned) to end
        the request with that response."""

    def post_call(self, call: Call) -> None:
        """After the call, exactly once per passed ``pre_call``, however the call ended."""

    def enter_fallback(self, call: Call, model: Model) -> Awaitable[None] | None:
        """Before the first attempt at fallback ``model`` (``call.model`` is still the alias asked
        for). Raise GatewayError (here or from the awaitable) to have the proxy skip ``model``."""

    def leave_fallback(self, call: Call, model: Model) -> None:
        """After the last attempt at fallback ``model``, once per ``enter_fallback`` that passed."""

    async def aclose(self) -> None:
        """At shutdown, after the last request: give back what the hook holds (connections, tasks)."""


class Pipeline:
    """Runs hooks in order and guarantees the post-call pairing."""

    def __init__(self, hooks: list[Hook] | None = None):
        self.hooks: list[Hook] = list(hooks or [])

    async def pre_call(self, call: Call) -> int:
        """Run every ``pre_call`` (awaiting what it returns); returns how many passed. If one raises,
        the ``post_call`` of those before it run, then the error propagates."""
        passed = 0
        try:
            for hook in self.hooks:
                pending = hook.pre_call(call)
                if pending is not None:
                    await pending
                passed += 1
        except BaseException:
            self.post_call(call, passed)
            raise
        return passed

    def post_call(self, call: Call, passed: int) -> None:
        for hook in reversed(self.hooks[:passed]):
            hook.post_call(call)

    async def enter_fallback(self, call: Call, model: Model) -> None:
        """Run every ``enter_fallback`` (awaiting what it returns). If one raises, the
        ``leave_fallback`` of those before it run, then the error propagates."""
        entered = 0
        try:
            for hook in self.hooks:
                pending = hook.enter_fallback(call, model)
                if pending is not None:
                    await pending
                entered += 1
        except BaseException:
            for hook in reversed(self.hooks[:entered]):
                hook.leave_fallback(call, model)
            raise

    def leave_fallback(self, call: Call, model: Model) -> None:
        for hook in reversed(self.hooks):
            hook.leave_fallback(call, model)

    async def aclose(self) -> None:
        for hook in self.hooks:
            await hook.aclose()
