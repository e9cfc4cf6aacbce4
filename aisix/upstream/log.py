"""One concise WARNING line per failed upstream call, rate-limited so a dead upstream can't flood.

    upstream call failed: model=gpt-4o deployment=east provider=openai upstream_model=gpt-4o status=401 \
        code=upstream_auth_failed upstream_status=401 request_id=req_abc: <message, redacted>

Lines are limited per (model, deployment, status): the first goes out at once, then at most one per
:data:`INTERVAL_S` seconds, carrying how many were suppressed meanwhile. Never a key or a prompt:
the message has passed :func:`~aisix.proxy.redact.redact`.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("aisix.upstream")

#: Seconds between two lines of the same (model, status).
INTERVAL_S = 10.0

_last: dict[tuple, tuple[float, int]] = {}  # (model, deployment, status) -> (last line at, suppressed since)
_MAX_KEYS = 4096  # bounded whatever the label churn


def upstream_failure(model: str, provider: str, upstream_model: str, status: int, code: str | None,
                     upstream_status: int | None, request_id: str | None, message: str,
                     deployment: str = "default", now: float | None = None) -> bool:
    """Log one failed upstream call (``status``: what the client got; ``upstream_status``: what the
    upstream answered, None when it did not answer). Returns True if a line was written."""
    now = time.monotonic() if now is None else now
    key = (model, deployment, status)
    last, suppressed = _last.get(key, (None, 0))
    if last is not None and now - last < INTERVAL_S:
        _last[key] = (last, suppressed + 1)
        return False
    if len(_last) >= _MAX_KEYS and key not in _last:
        _last.clear()
    _last[key] = (now, 0)
    more = f" ({suppressed} more like it in the last {now - last:.0f} s)" if suppressed else ""
    log.warning("upstream call failed: model=%s deployment=%s provider=%s upstream_model=%s status=%d code=%s "
                "upstream_status=%s request_id=%s: %s%s", model, deployment, provider, upstream_model, status, code or "-",
                upstream_status if upstream_status is not None else "-", request_id or "-", message[:300], more)
    return True
