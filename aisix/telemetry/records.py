"""The small record the request path fills in and hands to the batcher. Times in ns."""
from __future__ import annotations


def request_id(rec: "RequestRecord") -> str:
    """The gateway's own id of a request, sent as ``x-request-id`` when the upstream sent none:
    the trace id (32 hex digits), ``-``, the id of the gateway's span (16 hex digits), so a
    client's error can be found in the traces."""
    return f"{rec.trace_id:032x}-{rec.span_id:016x}"


class Attempt:
    """One upstream attempt of a request (routing may make several): which deployment of which
    alias, the CLIENT span it gets (``span_id``, also the parent in the ``traceparent`` sent
    upstream), when (``perf_counter_ns``), and what it got: ``status`` is the ``status_code``
    label (the upstream's HTTP status, or ``connect_error`` / ``timeout``), ``error`` a short
    description on failure (already masked), ``ok`` whether it answered 2xx."""

    __slots__ = ("model", "deployment", "provider", "upstream_model", "server_address", "span_id",
                 "start_ns", "end_ns", "status", "ok", "error")

    def __init__(self, model: str, deployment: str, provider: str, upstream_model: str, server_address: str,
                 span_id: int, start_ns: int):
        self.model, self.deployment, self.provider = model, deployment, provider
        self.upstream_model, self.server_address = upstream_model, server_address
        self.span_id, self.start_ns, self.end_ns = span_id, start_ns, 0
        self.status, self.ok, self.error = "", False, None

    def end(self, status: str, ok: bool, end_ns: int, error: str | None = None) -> None:
        self.status, self.ok, self.end_ns, self.error = status, ok, end_ns, error


class RequestRecord:
    """What one HTTP request did. The hot path only sets fields; the batcher derives metrics
    and the span from them after the fact.

    Times: ``*_ns`` from :func:`time.perf_counter_ns`; ``start_wall_ns`` from :func:`time.time_ns`
    at the same moment (to place the span). Tokens are ``None`` when no usage was reported.
    Trace ids are ints (W3C trace context, https://www.w3.org/TR/trace-context/).
    """

    __slots__ = ("method", "endpoint", "path", "status", "start_wall_ns", "start_ns", "end_ns",
                 "model", "provider", "request_model", "response_model", "operation", "stream",
                 "llm_start_ns", "llm_end_ns", "first_token_ns",
                 "prompt_tokens", "completion_tokens", "total_tokens", "finish_reasons",
                 "trace_id", "span_id", "parent_span_id", "trace_flags", "error", "admin", "upstream_status",
                 "usage_estimated", "attempts", "fallbacks", "upstream_errors", "gaps_ns", "zero_gaps",
                 "cached_tokens", "cache_write_tokens", "target", "cost_usd")

    def __init__(self, method: str, endpoint: str, path: str, start_wall_ns: int, start_ns: int):
        self.method = method
        self.endpoint = endpoint
        self.path = path
        self.status = 0
        self.start_wall_ns = start_wall_ns
        self.start_ns = start_ns
        self.end_ns = 0
        self.model: str | None = None          # the configured alias, never a raw client string
        self.provider: str | None = None
        self.request_model: str | None = None  # the upstream model id
        self.response_model: str | None = None
        self.operation = "chat"
        self.stream = False
        self.llm_start_ns = 0
        self.llm_end_ns = 0
        self.first_token_ns = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.total_tokens: int | None = None
        self.finish_reasons: tuple[str, ...] = ()
        self.trace_id = 0
        self.span_id = 0
        self.parent_span_id = 0
        self.trace_flags = 1
        self.error: str | None = None
        self.admin = False  # an Admin API request: counted apart from the proxy's seed series
        self.upstream_status: int | None = None  # a failed upstream call: what it answered (0: nothing)
        self.usage_estimated = False  # prompt/completion tokens are the gateway's estimate (no total)
        self.attempts: list[Attempt] = []  # one per upstream attempt, in order
        self.fallbacks: list[str] = []  # the fallback aliases tried, in order
        self.upstream_errors: list[tuple[str, str]] = []  # each failed upstream call: (model alias, upstream_status label)
        #: streams: the gaps (ns) between content events that came in different reads, and how many
        #: came in the same read as the one before (gap 0); see :class:`aisix.proxy.stream.StreamRelay`
        self.gaps_ns = ()
        self.zero_gaps = 0
        self.cached_tokens = self.cache_write_tokens = 0  # of prompt_tokens: read from / written to the prompt cache
        self.target = None  # the deployment (a one-upstream Model) of the last attempt: its price
        self.cost_usd: float | None = None  # set by the batcher (from the usage and target's price)

    def set_usage(self, prompt: int, completion: int, total: int, cached: int = 0, cache_write: int = 0) -> None:
        """The upstream's usage (tokens); ``cached``/``cache_write``: of ``prompt``, read from / written
        to the provider's prompt cache."""
        self.prompt_tokens, self.completion_tokens, self.total_tokens = prompt, completion, total
        self.cached_tokens, self.cache_write_tokens = cached, cache_write

    def estimate_usage(self, prompt: int, completion: int) -> None:
        """The gateway's own estimate (tokens) when the upstream reported no usage: shown on the
        span (``aisix.usage.estimated``), charged to rate limits, never counted in
        ``aisix_token_count_total`` (which counts what upstreams report). ``total_tokens`` stays None."""
        self.prompt_tokens, self.completion_tokens, self.usage_estimated = prompt, completion, True
