"""The proxy API (OpenAI-compatible): the road one request takes.

authentication → model and access checks → pre-call hooks → provider call → (relay) →
post-call hooks. Handlers fill the request's :class:`~aisix.telemetry.RequestRecord`; the
server middleware submits it. Routes: ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``GET /v1/models`` (https://platform.openai.com/docs/api-reference/chat); the other client APIs
(``/v1/messages``, ``/v1/responses``, ``/v1/completions``) are in :mod:`aisix.proxy.messages` and its siblings, built on
the pieces here.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from time import perf_counter_ns
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from aisix.config.resources import ApiKey, Model, hash_key
from aisix.config.snapshot import Snapshot
from aisix.errors import GatewayError, invalid_request, upstream_malformed
from aisix.gateway import GATEWAY
from aisix.hooks.pipeline import Call
from aisix.hooks.ratelimit import charged_tokens
from aisix.providers import Provider, StreamDecoder, get_provider
from aisix.providers.base import BYTES_PER_TOKEN
from aisix.proxy.redact import byte_masks, redact, redact_bytes
from aisix.proxy.routing import MAX_RETRY_WAIT_S, Router, failure_kind, retry_after_s, retryable
from aisix.proxy.stream import StreamRelay
from aisix.proxy.upstream_errors import gateway_error
from aisix.telemetry import RequestRecord, request_id
from aisix.telemetry.records import Attempt
from aisix.telemetry.tracecontext import format_traceparent, new_span_id
from aisix.upstream.errors import UpstreamError
from aisix.upstream.log import upstream_failure
from aisix.upstream.pool import UpstreamResponse

RECORD = web.RequestKey("aisix_record", RequestRecord)
log = logging.getLogger("aisix.proxy")

#: Upstream response headers worth passing back; hop-by-hop and framing headers never are.
PASSTHROUGH_HEADERS = ("x-request-id", "request-id", "openai-processing-ms", "openai-version",
                       "openai-organization", "anthropic-version", "x-goog-request-id")


def presented_key(request: web.Request) -> str:
    """The client key the request presents: ``Authorization: Bearer <key>`` (or a bare ``<key>``),
    else ``x-api-key: <key>`` (the Anthropic SDK's header, https://docs.anthropic.com/en/api/overview);
    ``""`` when there is none."""
    header = request.headers.get("Authorization", "").strip()
    if header[:7].lower() == "bearer ":
        header = header[7:].strip()
    return header or request.headers.get("x-api-key", "").strip()


def authenticate(request: web.Request, snap: Snapshot) -> ApiKey:
    """The API key the request presents (:func:`presented_key`): the secret is hashed once
    (SHA-256) and looked up by hash. Raises 401 ``missing_api_key``, ``invalid_api_key``,
    ``disabled_api_key`` or ``expired_api_key`` (at or after its ``expires_at``)."""
    header = presented_key(request)
    if not header:
        raise GatewayError(401, "Missing API key in request", "authentication_error", "missing_api_key")
    key = snap.keys.get(hash_key(header))
    if key is None:
        raise GatewayError(401, "Invalid API key", "authentication_error", "invalid_api_key")
    if key.disabled:
        raise GatewayError(401, "This API key is disabled.", "authentication_error", "disabled_api_key")
    if key.expires_at is not None and time.time() >= key.expires_ts:
        raise GatewayError(401, f"This API key expired at {key.expires_at}.", "authentication_error",
                           "expired_api_key")
    return key


#: The most JSON values (array elements, object members) a request body may hold. It bounds the
#: parse: 1 M values take ~50 ms and ~70 MB; a 28 MiB body of 10 M ``{}`` took 0.9 s and ~900 MB.
MAX_JSON_VALUES = 1_000_000
#: The deepest nesting of arrays and objects a request body may have (see :func:`json_too_deep`).
MAX_JSON_DEPTH = 240
#: The most ``messages`` a chat request may hold (Anthropic's documented per-request limit).
MAX_MESSAGES = 100_000
_SCAN_SLICE = 1 << 20


async def _json_values_over(raw: bytes, limit: int) -> bool:
    """True if ``raw`` may hold over ``limit`` JSON values: it counts ``,``, ``[`` and ``{`` (each
    value after the first of its container follows a ``,``; each container opens with one of the
    others), in 1 MiB slices that let the loop run in between. Bytes inside strings count too, so
    this over-counts; legitimate bodies stay far below the limit."""
    n = 0
    for i in range(0, len(raw), _SCAN_SLICE):
        j = i + _SCAN_SLICE
        n += raw.count(b",", i, j) + raw.count(b"[", i, j) + raw.count(b"{", i, j)
        if n > limit:
            return True
        await asyncio.sleep(0)
    return False


async def read_json_object(request: web.Request) -> dict:
    """The request body as a JSON object. Raises 400 for anything else, 413 ``request_too_large``
    for a body of over :data:`MAX_JSON_VALUES` values (refused before it is parsed)."""
    raw = await request.read()
    if len(raw) > MAX_JSON_VALUES and await _json_values_over(raw, MAX_JSON_VALUES):
        raise GatewayError(413, f"The request body holds over {MAX_JSON_VALUES} JSON values (array elements "
                           "and object members).", "invalid_request_error", "request_too_large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request("The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", "invalid_json")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_too_deep(body):
        raise invalid_request(f"The request body is nested over {MAX_JSON_DEPTH} levels deep.", "invalid_json")
    return body


def json_too_deep(doc) -> bool:
    """Whether ``doc`` (parsed JSON) nests arrays and objects over :data:`MAX_JSON_DEPTH` levels.
    orjson parses up to 1024 levels but writes at most 255, and a translation to the upstream's
    shape adds a few: such a body could not be sent on (the check: ``doc`` under 14 more levels
    still serialises)."""
    wrapped = doc
    for _ in range(254 - MAX_JSON_DEPTH):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return True
    return False


def media_type(content_type: str) -> str:
    """The media type of a ``Content-Type`` value, lower-cased and without parameters
    (``Text/Event-Stream; Charset=UTF-8`` → ``text/event-stream``; RFC 9110 §8.3.1: case-insensitive)."""
    return content_type.partition(";")[0].strip().lower()


def resolve_model(body: dict, key: ApiKey, snap: Snapshot, rec: RequestRecord) -> Model:
    """The configured model the body names, checked against the key. 400 ``model_not_found``,
    403 ``model_access_forbidden``. Only a configured alias ever reaches ``rec.model``."""
    name = body.get("model")
    if name is None or name == "":
        raise invalid_request("Missing `model` field in request body.", "model_not_found", "model")
    if not isinstance(name, str):
        raise invalid_request("`model` must be a string: the name of a configured model.", "invalid_type", "model")
    model = snap.models.get(name)
    if model is None:
        raise invalid_request(f"The model `{name}` does not exist.", "model_not_found", "model")
    if name not in key.allowed_models:
        raise GatewayError(403, f"This API key is not allowed to use model `{name}`.",
                           "permission_error", "model_access_forbidden")
    rec.model = name
    rec.provider = model.provider
    rec.request_model = model.model_id
    return model


def _passthrough(up: UpstreamResponse, extra: dict[str, str]) -> dict[str, str]:
    h = {name: up.headers[name] for name in PASSTHROUGH_HEADERS if name in up.headers}
    h.update(extra)
    return h


async def _call_upstream(request: web.Request, call: Call, provider: Provider, upreq) -> UpstreamResponse:
    """Send ``upreq`` to the attempt's target (``call.target``); a non-2xx answer is read whole
    and raised as the :class:`GatewayError` it stands for (``upstream_status`` set). The first
    call of a request starts ``aisix_llm_latency`` (the client-visible one)."""
    gw = request.app[GATEWAY]
    rec, target = call.record, call.target
    start = perf_counter_ns()
    rec.llm_start_ns = rec.llm_start_ns or start
    call.upstream_called = True
    try:
        up = await gw.pool.send(upreq, target.provider_config)
    except UpstreamError as e:
        raise gateway_error(e) from e
    if not 200 <= up.status < 300:
        data = await read_whole(up, call)
        if 400 <= up.status < 600:
            err = provider.error_from_response(up.status, up.headers, data)
            if provider.refused_credentials(up.status, err):
                err = upstream_refused_credentials(err, target)
        else:
            err = upstream_malformed(f"upstream {target.provider} answered HTTP {up.status}")
        err.upstream_status = up.status
        err.headers = _passthrough(up, err.headers)  # the upstream's request id helps the caller too
        raise err
    gw.router.succeeded(target, (perf_counter_ns() - start) / 1e6)
    call.upstream_status = up.status
    return up


def upstream_refused_credentials(err: GatewayError, model: Model) -> GatewayError:
    """An upstream 401/403/407: the *gateway's* provider credentials were refused, not the client's
    key. Same status, but code ``upstream_auth_failed`` and a message that says so (the upstream's
    after it); the gateway's own 401s say ``missing_api_key``/``invalid_api_key``. Counted in
    ``aisix_upstream_error_count_total{upstream_status}`` and logged."""
    return GatewayError(err.status, f"The upstream provider `{model.provider}` refused the gateway's credentials "
                        f"for model `{model.name}` (not your API key; tell the gateway's operator): {err.message}",
                        err.type, "upstream_auth_failed", err.headers, err.param)


def _upstream_failed(request: web.Request, call: Call, err: GatewayError, request_id: str | None) -> None:
    """An upstream call failed with ``err``: mask every secret in its message (it reaches the
    client, the span and the log): the provider keys, the admin keys and the request's own client
    key (the store holds no other client key in plaintext); then log one rate-limited line."""
    gw = request.app[GATEWAY]
    target = call.target
    secrets = (*gw.holder.current.secrets, target.provider_config.api_key, presented_key(request),
               *(k.key for k in gw.config.deployment.admin.admin_key))
    err.message = redact(err.message, secrets)
    err.type = redact(err.type, secrets)
    err.code = err.code and redact(err.code, secrets)
    err.param = err.param and redact(err.param, secrets)
    err.headers = {name: redact(value, secrets) for name, value in err.headers.items()}
    request_id = request_id and redact(request_id, secrets)
    call.record.upstream_status = err.upstream_status or 0
    call.record.upstream_errors.append((target.name, str(err.upstream_status) if err.upstream_status else "none"))
    upstream_failure(target.name, target.provider, target.model_id, err.status, err.code,
                     err.upstream_status, request_id, err.message, target.deployment_id)


async def _prepare_call(request: web.Request, operation: str) -> tuple[Call, dict]:
    """Authenticate (before reading the body, so an unauthenticated caller learns nothing else),
    read the JSON body, resolve the model. Returns ``(call, body)``."""
    rec = request[RECORD]
    snap = request.app[GATEWAY].holder.current  # this request's snapshot, kept to its end
    key = authenticate(request, snap)
    body = await read_json_object(request)
    model = resolve_model(body, key, snap, rec)
    rec.operation = operation
    call = Call(key, model, rec, request_bytes=len(await request.read()))  # cached by aiohttp: no second read
    return call, body


def _upstream_headers(call: Call) -> dict[str, str]:
    """``traceparent`` for the upstream: this attempt's CLIENT span as the parent."""
    rec = call.record
    if not rec.trace_id:
        return {}
    return {"traceparent": format_traceparent(rec.trace_id, call.attempt.span_id, rec.trace_flags)}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``, streamed (``"stream": true``) or not."""
    call, body = await _prepare_call(request, "chat")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise invalid_request(f"Invalid 'messages': array too long. Expected an array with maximum length "
                              f"{MAX_MESSAGES}, but got an array with length {len(messages)} instead.",
                              "array_above_max_length", "messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise invalid_request("`messages` must be a non-empty array of message objects.", "invalid_type", "messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_request("`stream` must be a boolean.", "invalid_type", "stream")
    opts = body.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
    call.record.stream = call.stream = stream

    async def attempt(provider: Provider, target: Model) -> web.StreamResponse:
        up = await call_streamable(request, call, provider, stream,
                                   lambda: provider.chat_request(target, body, stream, _upstream_headers(call)))
        if stream:
            return await relay_stream(request, up, provider.stream_decoder(include_usage), call)
        return await _whole(up, call, provider.chat_response)

    return await _with_hooks(request, call, lambda: route(request, call, attempt))


async def call_streamable(request: web.Request, call: Call, provider: Provider, stream: bool,
                          build) -> UpstreamResponse:
    """Call the upstream with ``build()`` (an :class:`~aisix.upstream.pool.UpstreamRequest`); a stream
    the upstream refused for the ``stream_options`` the gateway added
    (:meth:`~aisix.providers.Provider.refused_stream_options`) is asked once more, built anew
    (without them). Raises what :func:`_call_upstream` raises."""
    try:
        return await _call_upstream(request, call, provider, build())
    except GatewayError as e:
        if not (stream and provider.refused_stream_options(call.target, e)):
            raise
        log.info("model %s: the upstream refused stream_options (%s); asking without them from now on",
                 call.target.name, e.status)
        return await _call_upstream(request, call, provider, build())


async def route(request: web.Request, call: Call, attempt) -> web.StreamResponse:
    """Make the call, retrying and falling back as the model's ``routing`` and ``fallbacks`` say,
    only before the first byte went to the client: ``await attempt(provider, target)`` per try
    (a stream under way never raises; it ends in the stream). A failure that is not retryable
    (:func:`~aisix.proxy.routing.retryable`: a client error, or not in ``retry_on``) goes back as is;
    so does the last one when every attempt failed. A deployment that can't express the request
    (a 400 before any upstream call) is skipped for the next one or the fallbacks. A 429's
    ``Retry-After`` is waited for (at most :data:`~aisix.proxy.routing.MAX_RETRY_WAIT_S`) only when no
    other deployment is ready. ``x-aisix-deployment`` (``alias/id``) and ``x-aisix-attempts`` say
    where it went. Fallbacks are followed one level (a fallback's own fallbacks are not); each one
    is entered through the hooks (:meth:`~aisix.hooks.pipeline.Pipeline.enter_fallback`: its own
    ``rate_limit``), and one they refuse (429) is skipped like a model whose deployments are all
    full. When nothing answered, the client gets the last failure."""
    gw = request.app[GATEWAY]
    pipeline, rec = gw.pipeline, call.record
    error = refusal = None
    for n, model in enumerate(gw.router.chain(call.model, gw.holder.current.models)):
        if n:
            try:
                await pipeline.enter_fallback(call, model)
            except GatewayError as e:  # over the fallback's own limits: the next one
                error = e
                continue
            rec.fallbacks.append(model.name)
        try:
            done, failure, refused = await _try_model(request, call, model, attempt)
        finally:
            if n:
                pipeline.leave_fallback(call, model)
        if done is not None:
            return done
        error, refusal = failure or error, refusal or refused
    raise error or refusal


async def _try_model(request: web.Request, call: Call, model: Model, attempt):
    """The attempts at one model of the chain (its deployments, with retries). Returns ``(response,
    None, None)`` when one answered, else ``(None, the last retryable failure or the 429 of no room,
    the first refusal)``; raises a failure that is not retryable."""
    router = request.app[GATEWAY].router
    error = refusal = None
    tried: set[str] = set()
    refused: set[str] = set()
    for n in range(1 + model.retries):
        target = router.choose(model, tried, time.monotonic(), time.time())
        if target is not None and target.capacity is not None and router.shared is not None:
            target = await router.claim(model, target, tried, refused, call.state, time.monotonic(), time.time())
        if target is None:  # every deployment is at its own rate limit: the fallbacks, else a 429
            return None, error or deployments_full(model), refusal
        if target.deployment_id in refused:
            break  # only deployments that can't express this request are left
        tried.add(target.deployment_id)
        try:
            return await _attempt(request, call, model, target, attempt), None, None
        except _Refused as r:
            refused.add(target.deployment_id)
            refusal = refusal or r.error
            continue
        except GatewayError as e:
            if not retryable(e, model):
                raise
            error = e
            if n == model.retries or not await _wait_before_retry(router, model, target, e):
                break  # this model can't be retried in time: on to the fallbacks
    return None, error, refusal


class _Refused(Exception):
    """An attempt that ended before its upstream call (the provider can't express the request)."""

    def __init__(self, error: GatewayError):
        self.error = error


async def _attempt(request: web.Request, call: Call, model: Model, target: Model, attempt) -> web.StreamResponse:
    """One attempt at ``target`` (a deployment of ``model``), measured as an :class:`Attempt`."""
    gw, rec = request.app[GATEWAY], call.record
    call.target, call.upstream_called, call.stream_error = target, False, None
    call.masks = byte_masks(target.provider_config.api_key)
    rec.provider, rec.request_model, rec.target = target.provider, target.model_id, target
    provider = get_provider(target.provider)
    call.attempt = att = Attempt(model.name, target.deployment_id, target.provider, target.model_id,
                                 server_address(provider.base_url(target)), new_span_id(), perf_counter_ns())
    _count_attempt(call, call.attempts + 1)  # before the response is built, which takes them
    gw.router.started(target, time.time())
    try:
        resp = await attempt(provider, target)
    except GatewayError as e:
        if not call.upstream_called:  # refused before the call (e.g. a request this provider can't express)
            _count_attempt(call, call.attempts)
            raise _Refused(e) from None
        call.attempts += 1
        if e.upstream_status == 200 and e.status in (401, 403) and e.code != "upstream_auth_failed":
            e = upstream_refused_credentials(e, target)  # an auth error as a stream's first event
            e.upstream_status = 200
        _upstream_failed(request, call, e, e.headers.get("x-request-id") or e.headers.get("request-id"))
        att.end(attempt_status(e), False, perf_counter_ns(), e.message)
        rec.attempts.append(att)
        gw.router.failed(target, e, time.monotonic())
        raise e from None
    except asyncio.CancelledError:  # the client went away: the attempt is measured all the same
        if call.upstream_called:
            att.end("client_closed", False, perf_counter_ns(), "the client closed the request")
            rec.attempts.append(att)
        raise
    finally:
        gw.router.finished(target)
        if target.capacity is not None:
            gw.router.charge(target, charged_tokens(call), time.time(), call.state)
    call.attempts += 1
    broken = call.stream_error  # the stream broke after its 200: a failure of the deployment, not retried
    if broken is not None:
        att.end(attempt_status(broken), False, perf_counter_ns(), broken.message)
        gw.router.failed(target, broken, time.monotonic())
    else:
        att.end(str(call.upstream_status), True, perf_counter_ns())
    rec.attempts.append(att)
    return resp


def _count_attempt(call: Call, attempts: int) -> None:
    call.response_headers["x-aisix-deployment"] = f"{call.attempt.model}/{call.attempt.deployment}"
    call.response_headers["x-aisix-attempts"] = str(attempts)


@functools.lru_cache(maxsize=1024)
def server_address(base_url: str) -> str:
    """The host of an upstream's base URL (the span's ``server.address``)."""
    return urlsplit(base_url).hostname or ""


def deployments_full(model: Model) -> GatewayError:
    """429 when no deployment of ``model`` has room under its own ``rate_limit``; ``Retry-After``
    is the start of the next clock-aligned minute."""
    wait = 60 - int(time.time()) % 60
    return GatewayError(429, f"Every deployment of model `{model.name}` is at its rate limit; retry in {wait} s.",
                        "rate_limit_error", "deployment_capacity_exceeded", {"Retry-After": str(wait)})


def attempt_status(err: GatewayError) -> str:
    """The ``status_code`` label of a failed attempt: the upstream's HTTP status, or
    ``connect_error`` / ``timeout`` when it did not answer, ``malformed_response`` /
    ``stream_broken`` when its answer was unreadable or cut short."""
    if err.code in ("upstream_malformed_response", "upstream_stream_broken") and err.upstream_status in (None, 0, 200):
        return err.code.removeprefix("upstream_")
    kind = failure_kind(err)
    return kind if isinstance(kind, str) else str(err.upstream_status if err.upstream_status != 200 else kind)


async def _wait_before_retry(router: Router, model: Model, failed: Model, err: GatewayError) -> bool:
    """After a failure with a retry hint: go elsewhere at once if another deployment is ready (not
    cooling down, room under its own rate limit); else wait the hint if it is short. False when
    the model can't be retried in time."""
    hint = retry_after_s(err)
    if hint is None or hint == 0:
        return True
    now, wall = time.monotonic(), time.time()
    if any(t.deployment_id != failed.deployment_id and router.state(t).cooldown_until <= now
           and router.state(t).has_room(t.capacity, wall) for t in model.targets):
        return True
    if hint > MAX_RETRY_WAIT_S:
        return False
    await asyncio.sleep(hint)
    return True


async def _with_hooks(request: web.Request, call: Call, go) -> web.StreamResponse:
    """Run the pre-call hooks, ``await go()``, then the post-call hooks on every way out; the hooks'
    response headers go on errors too."""
    pipeline = request.app[GATEWAY].pipeline
    passed = await pipeline.pre_call(call)
    try:
        return await go()
    except GatewayError as e:
        e.headers = {**call.response_headers, **e.headers}
        raise
    finally:
        pipeline.post_call(call, passed)


async def read_whole(up: UpstreamResponse, call: Call) -> bytes:
    """The upstream's whole body (bytes), the attempt's upstream key masked in it
    (:func:`~aisix.proxy.redact.redact_bytes`); the upstream call ends (``llm_end_ns``) and its
    connection is let go however the read ends. Raises the transport's failure as a
    :class:`GatewayError` (:func:`~aisix.proxy.upstream_errors.gateway_error`)."""
    try:
        return redact_bytes(await up.read(), call.masks)
    except UpstreamError as e:
        raise gateway_error(e) from e
    finally:
        call.record.llm_end_ns = perf_counter_ns()
        up.close()


async def _whole(up: UpstreamResponse, call: Call, translate) -> web.Response:
    """Read a whole upstream body, translate it (``translate(bytes) -> ChatResult``), record it."""
    rec = call.record
    result = translate(await read_whole(up, call))
    rec.response_model, rec.finish_reasons = result.response_model, result.finish_reasons
    if result.usage is not None:
        u = result.usage
        rec.set_usage(u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.cache_write_tokens)
    return web.Response(body=result.body, content_type="application/json",
                        headers=_passthrough(up, call.response_headers))


class _IdleWatch:
    """Closes the upstream when no data event came for ``idle_ms``; one timer per idle period,
    re-armed lazily (the hot path only stores the relay's ``last_data_ns``, a perf_counter_ns stamp)."""

    __slots__ = ("up", "relay", "idle_ns", "fired", "handle", "loop")

    def __init__(self, up: UpstreamResponse, relay: StreamRelay, idle_ms: int):
        self.up = up
        self.relay = relay
        self.idle_ns = idle_ms * 1_000_000
        self.fired = False
        self.loop = asyncio.get_running_loop()
        self.handle = self.loop.call_later(idle_ms / 1000, self._check)

    def _check(self) -> None:
        left = self.relay.last_data_ns + self.idle_ns - perf_counter_ns()
        if left > 0:
            self.handle = self.loop.call_later(left / 1e9, self._check)
            return
        self.fired = True
        self.up.close()

    def cancel(self) -> None:
        self.handle.cancel()


async def relay_stream(request: web.Request, up: UpstreamResponse, decoder: StreamDecoder,
                       call: Call) -> web.StreamResponse:
    """Relay the upstream's SSE events to the client as they arrive: the IO around the sans-IO
    :class:`~aisix.proxy.stream.StreamRelay`, which makes every protocol decision.

    The 200 goes out with the first bytes to write. A failure after it ends the stream with one
    error event in the client's API (no ``[DONE]``) and is measured as 502 (upstream error,
    malformed or broken stream) or 504 (timeout); before it, the client gets a JSON error with the
    status the error stands for. A stream with no data event for ``stream_idle_timeout_ms``
    (comments don't count) ends: cleanly with ``[DONE]`` if a ``finish_reason`` was seen, else as
    a 504.
    """
    model = call.target
    if media_type(up.headers.get("content-type", "")) != "text/event-stream":
        await read_whole(up, call)
        raise upstream_malformed(f"upstream {model.provider} did not answer with an event stream")
    relay = StreamRelay(decoder, model.provider, perf_counter_ns())
    idle_ms = model.provider_config.stream_idle_timeout_ms
    idle = _IdleWatch(up, relay, idle_ms)
    try:
        out, last = await _relay_reads(request, up, call, relay)
        if idle.fired and (relay.error is None or relay.error.status == 502):
            last += relay.idle_timeout(idle_ms)
        return await _end_stream(request, up, call, relay, out, last)
    finally:  # every way out, a client disconnect (cancellation) included, records what the stream got
        idle.cancel()
        _record_stream(call, relay)
        if relay.clean:
            up.release()
        else:
            up.close()


async def _relay_reads(request: web.Request, up: UpstreamResponse, call: Call,
                       relay: StreamRelay) -> tuple[web.StreamResponse | None, bytes]:
    """The read loop: each upstream read fed to the relay, what it returns written at once (the
    200 goes out with the first bytes). Returns the client response (None: nothing sent yet) and
    the bytes the upstream's end still gives (a last event, an added ``[DONE]``)."""
    out: web.StreamResponse | None = None
    chunks = up.iter_chunks()
    last = b""
    try:
        async for chunk in chunks:
            data = relay.feed(chunk, perf_counter_ns())
            if data and call.masks:
                data = redact_bytes(data, call.masks)
            if data:
                out = out or await _start_stream(request, up, call)
                await out.write(data)
            if relay.over:
                break
        else:
            last = redact_bytes(relay.eof(), call.masks)
        if relay.awaiting_lf:  # "[DONE]\r\n\r" then "\n" in the next read: relay it too
            relay.clean = await _relay_final_lf(chunks, out)
    except UpstreamError as e:
        relay.broken(gateway_error(e))
    return out, last


async def _end_stream(request: web.Request, up: UpstreamResponse, call: Call, relay: StreamRelay,
                      out: web.StreamResponse | None, last: bytes) -> web.StreamResponse:
    """Write the stream's end: ``last``, then the error event if the relay ends in an error
    (measured 502/504, logged, masked), then EOF. An error before anything was sent is raised
    instead (the client gets it as a JSON error with its own status)."""
    rec = call.record
    rec.llm_end_ns = perf_counter_ns()
    error = relay.error
    if error is not None and out is None and not last:
        raise error
    out = out or await _start_stream(request, up, call)
    if last:
        await out.write(last)
    if error is not None:
        error.upstream_status = error.upstream_status or up.status  # it did answer: an error in its stream
        call.stream_error = error
        _upstream_failed(request, call, error, up.headers.get("x-request-id"))
        rec.error = error.message
        rec.status = error.status if error.status == 504 else 502  # after the 200: the gateway's failure to deliver
        await out.write(redact_bytes(relay.decoder.error_event(error), call.masks))
    await out.write_eof()
    if rec.status == 0:
        rec.status = 200
    return out


def _record_stream(call: Call, relay: StreamRelay) -> None:
    """What the stream got, into the record: first token, inter-token gaps, usage (the upstream's, else the
    gateway's estimate), response model, finish reasons; the completion estimate for the limits."""
    rec, decoder = call.record, relay.decoder
    rec.llm_end_ns = rec.llm_end_ns or perf_counter_ns()
    rec.first_token_ns = relay.first_token_ns
    rec.gaps_ns, rec.zero_gaps = relay.gaps_ns, relay.zero_gaps
    if decoder.usage is not None:
        u = decoder.usage
        rec.set_usage(u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.cache_write_tokens)
    elif relay.completion_events:  # no usage from the upstream: the gateway's estimate, for the span and the limits
        rec.estimate_usage(-(-call.request_bytes // BYTES_PER_TOKEN), relay.completion_events)
    call.estimated_completion_tokens = relay.completion_events
    rec.response_model = decoder.response_model
    rec.finish_reasons = tuple(decoder.finish_reasons)


async def _relay_final_lf(chunks, out: web.StreamResponse | None) -> bool:
    """Wait briefly for the LF that completes a CRLF split across reads; relay it. Returns True if
    the upstream read ended normally (the connection may be reused)."""
    try:
        nxt = await asyncio.wait_for(chunks.__anext__(), 0.2)
    except (StopAsyncIteration, asyncio.TimeoutError, UpstreamError):
        return False
    if nxt[:1] == b"\n" and out is not None:
        await out.write(b"\n")
    return True


async def _start_stream(request: web.Request, up: UpstreamResponse, call: Call) -> web.StreamResponse:
    headers = _passthrough(up, call.response_headers)
    rid = headers["x-aisix-request-id"] = request_id(call.record)
    headers.setdefault("x-request-id", rid)
    headers["Content-Type"] = up.headers.get("content-type", "text/event-stream")
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    out = web.StreamResponse(status=200, headers=headers)
    await out.prepare(request)
    return out


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings`` (https://platform.openai.com/docs/api-reference/embeddings)."""
    call, body = await _prepare_call(request, "embeddings")
    inputs = body.get("input")
    if not (isinstance(inputs, str) and inputs or isinstance(inputs, list) and inputs):
        raise invalid_request("`input` must be a non-empty string or a non-empty array (of strings or of token "
                              "arrays).", "invalid_type", "input")

    async def attempt(provider: Provider, target: Model) -> web.Response:
        upreq = provider.embeddings_request(target, body, _upstream_headers(call))
        up = await _call_upstream(request, call, provider, upreq)
        return await _whole(up, call, lambda data: provider.embeddings_response(data, upreq))

    return await _with_hooks(request, call, lambda: route(request, call, attempt))


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models the caller's key may use, in OpenAI's list shape."""
    snap = request.app[GATEWAY].holder.current
    key = authenticate(request, snap)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": snap.models[name].provider}
            for name in key.allowed_models if name in snap.models]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one model the caller's key may use, in OpenAI's model shape
    (https://platform.openai.com/docs/api-reference/models/retrieve); 404 ``model_not_found``
    for a model that does not exist or that the key may not use (which of the two is not told)."""
    snap = request.app[GATEWAY].holder.current
    key = authenticate(request, snap)
    name = request.match_info["model"]
    model = snap.models.get(name) if name in key.allowed_models else None
    if model is None:
        raise GatewayError(404, f"The model `{name}` does not exist.", "invalid_request_error",
                           "model_not_found", param="model")
    return web.Response(body=orjson.dumps({"id": name, "object": "model", "created": 0, "owned_by": model.provider}),
                        content_type="application/json")
