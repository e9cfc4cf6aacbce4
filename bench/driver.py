"""The driver: start everything pinned, run every scenario against every target
interleaved (round 1: A B C D, round 2: A B C D, ...), collect raw samples,
hand them to :mod:`bench.report`, stop everything it started (by PID).

Core layout on a 2-core machine: core 0 = load generator, upstream emulator,
Prometheus, trace sink, this driver; core 1 = the target under test (and the
``direct`` emulator, which is a target).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time

import psutil

from bench import report, targets
from bench._util import pin
from bench.loadgen import Job, chat_body, serve_jobs
from bench.procs import Proc, Skip
from bench.scenarios import FULL, QUICK, SCENARIOS, Scenario, run_duration, warmup_requests

ORDER = ["direct", "aisix-base", "aisix", "aisix-redis", "aisix-notel", "nginx", "litellm"]


class LoadGen:
    """The load generator's own process (spawned once, pinned to the client core), fed Jobs over a pipe."""

    def __init__(self, cpus):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_jobs, args=(child, cpus), daemon=True, name="bench-loadgen")
        self.proc.start()

    def run(self, job: Job, on_warm, timeout_s: float) -> dict:
        """Send the job; call ``on_warm()`` when its warm-up is over; return its result."""
        self.conn.send(job)
        for _ in range(2):
            if not self.conn.poll(timeout_s):
                raise RuntimeError(f"load generator gave no answer in {timeout_s:g} s")
            msg = self.conn.recv()
            if msg == "warm":
                on_warm()
                self.conn.send("go")
                continue
            return msg
        raise RuntimeError("load generator protocol error")

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)


class RssSampler(threading.Thread):
    """Samples a target's resident memory (MB) every ``period_s`` while ``active``; keeps the max."""

    def __init__(self, period_s: float = 0.1):
        super().__init__(daemon=True)
        self.period_s, self.proc, self.peak, self.stop_ev = period_s, None, 0.0, threading.Event()
        self.lock = threading.Lock()

    def watch(self, proc: Proc | None) -> float:
        """Start watching ``proc``; return the peak seen for the previous one."""
        with self.lock:
            peak, self.proc, self.peak = self.peak, proc, 0.0
        return peak

    def run(self):
        while not self.stop_ev.wait(self.period_s):
            with self.lock:
                if self.proc is not None:
                    self.peak = max(self.peak, self.proc.rss_mb())


class Progress:
    """One progress line on stderr (rewritten in place on a terminal, a line per step otherwise)."""

    def __init__(self, total_runs: int, eta_s: float):
        self.total, self.done, self.eta, self.t0 = total_runs, 0, eta_s, time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, text: str, run_s: float) -> None:
        self.done += 1
        self.eta = max(0.0, self.eta - run_s)
        line = f"[{self.done:3d}/{self.total}] {time.monotonic() - self.t0:5.0f}s  {text}  (~{self.eta:.0f}s left)"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        sys.stderr.write(("\r\033[K" if self.tty else "") + text + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _layout():
    """(client cpus, target cpus, note): core 0 vs core 1 when there are two or more."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None, "no sched_setaffinity here: nothing pinned"
    if len(cpus) < 2:
        return None, None, "one CPU: nothing pinned, the client and the target share it"
    return {cpus[0]}, set(cpus[1:2]), ""


def _start_targets(tmp, want, target, upstream, prom, sink, redis, notes) -> list:
    """Start each wanted target on the target cpus; a failure becomes a note, not an error."""
    started = []
    for name in want:
        try:
            if name == "direct":
                t = targets.start_direct(tmp, target)
            elif name in ("aisix", "aisix-redis", "aisix-notel", "aisix-base"):
                if name == "aisix-redis" and redis is None:
                    raise Skip(notes.get("redis", "no redis-server"))
                if name == "aisix-base" and not targets.BASE_ROOT:
                    raise Skip("AISIX_BENCH_BASE is not set")
                t = targets.start_aisix(tmp, name, target, upstream.port, prom.port if prom else None,
                                        sink.port if sink else targets.free_port(), telemetry=name != "aisix-notel",
                                        limits=True, redis_port=redis.port if name == "aisix-redis" else None,
                                        root=targets.BASE_ROOT if name == "aisix-base" else targets.ROOT)
            elif name == "nginx":
                t = targets.start_nginx(tmp, target, upstream.port)
            elif name == "litellm":
                t = targets.start_litellm(tmp, target, upstream.port, allow_install=True)
            else:
                continue
        except Skip as e:
            notes[name] = f"skipped: {e}"
            continue
        except Exception as e:  # noqa: BLE001 -- a broken target must not stop the others
            notes[name] = f"skipped: {type(e).__name__}: {e}"
            continue
        started.append(t)
    return started


def run(quick: bool = False, peers: bool = False, only: list[str] | None = None,
        out_dir: str | None = None, scenarios: list[str] | None = None) -> dict:
    """Run the whole bench (or only the ``scenarios`` of these keys); write ``latest.json`` and
    ``latest.png`` under ``out_dir``; return the report. Raises ValueError for an unknown scenario key."""
    plan = QUICK if quick else FULL
    unknown = set(scenarios or ()) - {s.key for s in SCENARIOS}
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(s.key for s in SCENARIOS)}")
    chosen = [s for s in SCENARIOS if not scenarios or s.key in scenarios]
    client, target, layout_note = _layout()
    pin(0, client)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    want = [n for n in ORDER if (peers or n != "litellm") and (not only or n in only)
            and (n != "aisix-base" or targets.BASE_ROOT)]
    notes: dict[str, str] = {}
    infra: list[Proc] = []
    tlist: list[targets.Target] = []
    samples: dict = {}
    tmp = tempfile.mkdtemp(prefix="aisix-bench-")
    loadgen = sampler = None
    t_start = time.time()
    telemetry: dict = {}
    try:
        upstream = targets.start_emulator(tmp, "upstream", client)
        infra.append(upstream)
        prom = sink = redis = None
        if "aisix-redis" in want:
            try:
                redis = targets.start_redis(tmp, client)  # on the client's core, like the other infra
                infra.append(redis)
            except Skip as e:
                notes["redis"] = str(e)
        if any(n in ("aisix", "aisix-redis", "aisix-base") for n in want):
            prom, pnote = targets.start_prometheus(tmp, client, allow_build=not quick)
            if prom:
                infra.append(prom)
            else:
                notes["prometheus"] = pnote
            sink = targets.start_tracesink(tmp, client)
            if sink:
                infra.append(sink)
            else:
                notes["traces"] = "grpcio missing: traces exported to a port where nothing listens"
        tlist = _start_targets(tmp, want, target, upstream, prom, sink, redis, notes)
        loadgen = LoadGen(client)
        sampler = RssSampler()
        sampler.start()
        runs = plan.rounds * len(chosen) * len(tlist)
        eta = plan.rounds * len(tlist) * sum(run_duration(plan, s) + 0.15 for s in chosen)
        prog = Progress(runs, eta)
        for t in tlist:  # one unrecorded warm-up pass per target
            for sc in (SCENARIOS[1], SCENARIOS[4]):
                _measure(loadgen, sampler, t, sc, plan, infra, warm_only=True)
        for rnd in range(plan.rounds):
            for sc in chosen:
                for t in tlist:
                    if not t.proc.alive():
                        notes.setdefault(t.name, f"died during the run (exit {t.proc.popen.returncode}): "
                                                 f"{t.proc.log_tail(3)}")
                        prog.step(f"{sc.key:10s} {t.name:12s} DEAD", run_duration(plan, sc))
                        continue
                    r = _measure(loadgen, sampler, t, sc, plan, infra)
                    samples.setdefault(sc.key, {}).setdefault(t.name, []).append(r)
                    rps = r["ok"] / r["wall_s"] if r.get("wall_s") else 0
                    prog.step(f"round {rnd + 1}/{plan.rounds} {sc.key:10s} {t.name:12s} {rps:8.0f} req/s "
                              f"err {r['errors']}", run_duration(plan, sc))
        prog.end()
        for t in tlist:
            notes.setdefault(t.name, "")
        telemetry = _telemetry(prom, tlist)
    finally:
        hwm = {}
        for t in tlist:
            hwm[t.name] = t.proc.hwm_mb()
            t.proc.stop()
        if sampler:
            sampler.stop_ev.set()
        if loadgen:
            loadgen.close()
        for p in infra:
            p.stop()
    if sink_counts := _sink_counts(infra):
        telemetry["trace_sink"] = sink_counts
    meta = {"quick": quick, "peers": peers, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
            "elapsed_s": round(time.time() - t_start, 1), "plan": plan.__dict__, "cpus": os.cpu_count(),
            "client_cpus": sorted(client) if client else None, "target_cpus": sorted(target) if target else None,
            "layout_note": layout_note, "python": sys.version.split()[0], "tmp": tmp}
    rep = report.build(meta, chosen, [t.name for t in tlist], samples, notes, hwm, telemetry)
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(_finite(rep), f, indent=1)
    print(report.render(rep))
    try:
        report.plot(rep, os.path.join(out_dir, "latest.png"))
    except Exception as e:  # noqa: BLE001 -- the table and JSON are already out
        print(f"(plot failed: {type(e).__name__}: {e})")
    print(f"\nwrote {os.path.join(out_dir, 'latest.json')} and latest.png")
    return rep


def _measure(loadgen: LoadGen, sampler: RssSampler, t, sc: Scenario, plan, infra, warm_only=False) -> dict:
    dur = run_duration(plan, sc)
    job = Job("127.0.0.1", t.port, body=chat_body(sc.stream, sc.chunks, sc.ttft_ms, sc.gap_ms), stream=sc.stream,
              chunks=sc.chunks, n=0 if warm_only else plan.max_requests, concurrency=sc.concurrency,
              duration_s=0.3 if warm_only else dur, timeout_s=plan.timeout_s, record_chunks=sc.timing,
              warmup=max(100, warmup_requests(sc)) if warm_only else warmup_requests(sc),
              stagger_s=sc.gap_ms / 1e3 / sc.concurrency if sc.timing else 0.0)
    snap = {}
    me = psutil.Process()

    def on_warm():
        sampler.watch(t.proc)
        snap["cpu"] = t.proc.cpu_s()
        snap["helpers"] = sum(p.cpu_s() for p in infra)
        snap["me"] = sum(me.cpu_times()[:2])
        snap["busy"] = _busy_s()

    try:
        r = loadgen.run(job, on_warm, dur + plan.timeout_s + 30)
    except RuntimeError as e:
        r = {"fatal": str(e)}
    if "fatal" in r:
        return {"lat_ms": [], "ttfb_ms": [], "gaps_ms": [], "ok": 0, "errors": 1, "error_kinds": {r["fatal"]: 1},
                "wall_s": dur, "cpu_s": 0.0, "chunks": 0, "target_cpu_s": 0.0, "helper_cpu_s": 0.0, "rss_mb": 0.0,
                "foreign_cpu_s": 0.0}
    busy = _busy_s() - snap.get("busy", 0.0)
    r["target_cpu_s"] = t.proc.cpu_s() - snap.get("cpu", 0.0)
    r["helper_cpu_s"] = sum(p.cpu_s() for p in infra) - snap.get("helpers", 0.0)
    driver = sum(me.cpu_times()[:2]) - snap.get("me", 0.0)
    # CPU that the machine spent on anything the bench did not start (other users' work): disturbs the figures
    r["foreign_cpu_s"] = max(0.0, busy - r["target_cpu_s"] - r["helper_cpu_s"] - r["cpu_s"] - driver)
    r["rss_mb"] = max(sampler.watch(None), t.proc.rss_mb())
    return r


def _finite(x):
    """The report with NaN/inf turned into null, so that the file is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _busy_s() -> float:
    """CPU seconds all CPUs have been busy (not idle, not waiting for I/O) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _telemetry(prom, tlist) -> dict:
    """What reached Prometheus from the gateway with telemetry on (series names per infra.md)."""
    if prom is None or not any(t.name == "aisix" for t in tlist):
        return {}
    out = {"prometheus_port": prom.port}
    for q in ("sum(aisix_request_count_total)", "sum(aisix_request_latency_milliseconds_count)"):
        out[q] = targets.prometheus_query(prom.port, q)
    return out


def _sink_counts(infra) -> dict | None:
    for p in infra:
        if p.name == "tracesink" and p.log and os.path.exists(p.log):
            for line in reversed(open(p.log).read().splitlines()):
                if line.startswith("{"):
                    try:
                        return json.loads(line)
                    except ValueError:
                        return None
    return None
