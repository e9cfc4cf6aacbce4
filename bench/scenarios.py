"""The scenarios every target runs, and how long each run lasts (quick vs full)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    stream: bool
    chunks: int          # content chunks per response (count)
    concurrency: int     # requests in flight (count)
    ttft_ms: float = 0.0  # upstream time to first chunk (ms)
    gap_ms: float = 0.0   # upstream gap between chunks (ms)

    @property
    def timing(self) -> bool:
        """A chunk-timing scenario: per-chunk arrival times are recorded."""
        return self.gap_ms > 0


SCENARIOS = [
    Scenario("ns-c1", "non-streaming, c=1", False, 20, 1),
    Scenario("ns-c32", "non-streaming, c=32", False, 20, 32),
    Scenario("ns-c128", "non-streaming, c=128", False, 20, 128),
    Scenario("s20-c1", "streaming 20 chunks, c=1", True, 20, 1),
    Scenario("s20-c32", "streaming 20 chunks, c=32", True, 20, 32),
    Scenario("s20-c128", "streaming 20 chunks, c=128", True, 20, 128),
    Scenario("s200-c32", "streaming throughput, 200 chunks, c=32", True, 200, 32),
    Scenario("gap20-c32", "chunk timing, 20 chunks 20 ms apart, c=32", True, 20, 32, gap_ms=20.0),
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Run sizes. ``duration_s`` bounds each measured run in time, ``max_requests`` in count."""

    rounds: int
    duration_s: float
    timing_duration_s: float
    max_requests: int
    timeout_s: float


QUICK = Plan(rounds=2, duration_s=0.35, timing_duration_s=0.8, max_requests=20_000, timeout_s=10.0)
FULL = Plan(rounds=3, duration_s=2.5, timing_duration_s=2.5, max_requests=200_000, timeout_s=15.0)


def run_duration(plan: Plan, sc: Scenario) -> float:
    """The time bound of one measured run of ``sc`` (s)."""
    return plan.timing_duration_s if sc.timing else plan.duration_s


def warmup_requests(sc: Scenario) -> int:
    """Unrecorded requests before each run: enough to open every connection (count)."""
    return 0 if sc.timing else max(10, 2 * sc.concurrency)
