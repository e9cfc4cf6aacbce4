"""What rate limits cost per request: ``python -m bench.ratelimit_cost [--load]``.

1. **Micro**: the pipeline's ``pre_call`` + ``post_call`` per request (ns), in this process, for:
   no hook at all; the rate-limit hook with no limits on the key or model; limits on the key
   (rpm, tpm, concurrency); all five limits on both key and model. Limits are set high enough
   never to reject, so every request takes the full path (check, take, headers, charge, release).
2. **Load** (``--load``): one gateway process (``bench.targets.start_aisix``) in front of the
   emulator; the load generator alternates runs with the key's and model's limits off and on
   (switched live through the Admin API), and reports the gateway's CPU time per request (µs),
   throughput and latency for each.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request

from aisix.config.resources import ApiKey, Model, hash_key
from aisix.hooks.pipeline import Call, Pipeline
from aisix.hooks.ratelimit import RateLimitHook
from aisix.telemetry.records import RequestRecord

BIG = 10**9
ALL_FIVE = {"rpm": BIG, "rpd": BIG, "tpm": BIG, "tpd": BIG, "concurrency": BIG}
CASES = [
    ("no hook", None, None, False),
    ("hook, no limits", None, None, True),
    ("key: rpm+tpm+concurrency", {"rpm": BIG, "tpm": BIG, "concurrency": BIG}, None, True),
    ("key+model: all five each", ALL_FIVE, ALL_FIVE, True),
]


def micro_once(key_rl, model_rl, with_hook: bool, n: int) -> float:
    """ns per request of Call + pre_call + usage + post_call over ``n`` requests."""
    return asyncio.run(_micro_once(key_rl, model_rl, with_hook, n))


async def _micro_once(key_rl, model_rl, with_hook: bool, n: int) -> float:
    key = ApiKey(id="k1", key_hash=hash_key("sk-bench"), allowed_models=["m1"], rate_limit=key_rl)
    model = Model(id="m1", name="m1", model="openai/up-1", rate_limit=model_rl)
    pipeline = Pipeline([RateLimitHook(clock=time.time)] if with_hook else [])
    rec = RequestRecord("POST", "/v1/chat/completions", "/v1/chat/completions", 0, 0)
    rec.set_usage(8, 20, 28)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        call = Call(key, model, rec)
        passed = await pipeline.pre_call(call)
        pipeline.post_call(call, passed)
    return (time.perf_counter_ns() - t0) / n


def micro(n: int, rounds: int) -> list[tuple[str, float]]:
    out = []
    for name, krl, mrl, hook in CASES:
        micro_once(krl, mrl, hook, n // 10)  # warm-up
        out.append((name, statistics.median(micro_once(krl, mrl, hook, n) for _ in range(rounds))))
    return out


# -- load through a gateway --------------------------------------------------------------------------

def _admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": "Bearer bench-admin", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def _set_limits(admin: str, proxy: str, body: bytes, rl: dict | None) -> None:
    """Put ``rl`` (None: no limits) on the bench key and model, live, through the Admin API, and
    check with one request that the gateway applies it."""
    from bench.targets import AUTH, CLIENT_KEY
    for kind in ("apikeys", "models"):
        for obj in _admin(admin, "GET", f"/{kind}")["list"]:
            rid = obj.pop("id")
            if kind == "apikeys":
                obj["key"] = CLIENT_KEY  # the listing masks it
            obj["rate_limit"] = rl
            _admin(admin, "PUT", f"/{kind}/{rid}", obj)
    req = urllib.request.Request(proxy + "/v1/chat/completions", data=body,
                                 headers={**AUTH, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        limited = "x-ratelimit-limit-requests" in r.headers
    if limited != (rl is not None):
        raise RuntimeError(f"limits {'on' if rl else 'off'} but the response {'has' if limited else 'lacks'} them")


def load(n: int, concurrency: int, rounds: int, stream: bool) -> list[dict]:
    import yaml

    from bench._util import run as aio_run
    from bench.loadgen import Job, chat_body, run_load
    from bench.targets import AUTH, start_aisix, start_emulator

    tmp = tempfile.mkdtemp(prefix="aisix-rl-bench-")
    emu = start_emulator(tmp, "emulator", None)
    gw = None
    try:
        gw = start_aisix(tmp, "aisix", None, emu.port, None, 1, telemetry=False)
        with open(os.path.join(tmp, "aisix", "config.yaml")) as f:
            admin = "http://" + yaml.safe_load(f)["server"]["admin"]["listen"] + "/aisix/admin"
        body = chat_body(stream, 5)
        job = Job("127.0.0.1", gw.port, body=body, stream=stream, chunks=5, n=n,
                  concurrency=concurrency, duration_s=120, headers={k.lower(): v for k, v in AUTH.items()},
                  warmup=min(n, 2000))
        results = []
        for r in range(rounds):
            for label, rl in (("off", None), ("on", ALL_FIVE)) if r % 2 == 0 else (("on", ALL_FIVE), ("off", None)):
                _set_limits(admin, f"http://127.0.0.1:{gw.port}", chat_body(False, 1), rl)
                cpu0 = gw.proc.cpu_s()
                res = aio_run(run_load(job))
                cpu = gw.proc.cpu_s() - cpu0
                lat = sorted(res["lat_ms"])
                results.append({"limits": label, "ok": res["ok"], "errors": res["errors"],
                                "rps": res["ok"] / res["wall_s"], "gw_cpu_us": cpu / max(1, res["issued"]) * 1e6,
                                "p50_ms": lat[len(lat) // 2] if lat else float("nan"),
                                "p99_ms": lat[int(len(lat) * 0.99)] if lat else float("nan")})
        return results
    finally:
        if gw is not None:
            gw.proc.stop()
        emu.stop()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000, help="requests per micro run")
    ap.add_argument("--rounds", type=int, default=5, help="micro runs per case (median shown)")
    ap.add_argument("--load", action="store_true", help="also measure through a gateway process")
    ap.add_argument("--load-n", type=int, default=10_000, help="requests per load run")
    ap.add_argument("--load-rounds", type=int, default=4, help="off/on pairs")
    ap.add_argument("-c", type=int, default=32, help="load concurrency")
    ap.add_argument("--stream", action="store_true", help="streamed requests in the load runs")
    args = ap.parse_args(argv)

    rows = micro(args.n, args.rounds)
    base = rows[0][1]
    print(f"micro: pre_call + post_call per request, median of {args.rounds} x {args.n}")
    for name, ns in rows:
        print(f"  {name:<28} {ns / 1000:7.2f} µs   (+{(ns - base) / 1000:.2f} µs over no hook)")
    if args.load:
        res = load(args.load_n, args.c, args.load_rounds, args.stream)
        print(f"load: {args.load_n} {'streamed' if args.stream else 'plain'} requests x {len(res)} runs, "
              f"concurrency {args.c}, gateway telemetry off")
        for r in res:
            print(f"  limits {r['limits']:<3}  {r['rps']:8.0f} req/s  gateway CPU {r['gw_cpu_us']:6.1f} µs/req  "
                  f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}")
        for label in ("off", "on"):
            sel = [r for r in res if r["limits"] == label]
            print(f"  median {label:<3}: {statistics.median(r['rps'] for r in sel):8.0f} req/s  "
                  f"gateway CPU {statistics.median(r['gw_cpu_us'] for r in sel):6.1f} µs/req")


if __name__ == "__main__":
    main()
