"""Figures from raw samples, the terminal table, the JSON report and the PNG plot.

Units: latencies in ms, CPU in seconds of CPU per 1,000 requests or chunks
(numerically, also ms of CPU per request / µs per chunk), RSS in MB, req/s.
"""
from __future__ import annotations

import math

from bench.stats import pcts

BUSY = 0.9  # a side counts as the limit when its CPU is this busy (share of one core)


def _q(xs, n=101) -> list:
    """n evenly spaced quantiles of xs (for plotting CDFs from the JSON alone)."""
    if not xs:
        return []
    s = sorted(xs)
    return [round(s[min(len(s) - 1, round(i * (len(s) - 1) / (n - 1)))], 4) for i in range(n)]


def _merge(runs: list) -> dict:
    m = {"lat": [], "ttfb": [], "gaps": [], "delay": [], "gap_err": [], "kinds": {}}
    for k in ("ok", "errors", "wall_s", "cpu_s", "target_cpu_s", "helper_cpu_s", "chunks", "foreign_cpu_s"):
        m[k] = sum(r.get(k, 0) for r in runs)
    for r in runs:
        m["lat"] += r["lat_ms"]
        m["ttfb"] += r["ttfb_ms"]
        m["gaps"] += r["gaps_ms"]
        m["delay"] += r.get("delay_ms", [])
        m["gap_err"] += [abs(x) for x in r.get("gap_err_ms", [])]
        for e, c in r.get("error_kinds", {}).items():
            m["kinds"][e] = m["kinds"].get(e, 0) + c
    m["rss"] = max((r.get("rss_mb", 0) for r in runs), default=0)
    m["capped"] = any(r.get("time_capped") for r in runs)
    return m


def _bound(client_util: float, core0_util: float, target_util: float) -> str:
    client = client_util >= BUSY or core0_util >= BUSY + 0.05
    tgt = target_util >= BUSY
    return "both" if client and tgt else "client" if client else "target" if tgt else "-"


def build(meta, scenarios, names, samples, notes, hwm, telemetry) -> dict:
    """The whole report as a JSON-ready dict."""
    res: dict = {}
    for sc in scenarios:
        per = samples.get(sc.key, {})
        row = {}
        for name in names:
            if name not in per:
                continue
            m = _merge(per[name])
            wall = m["wall_s"] or math.nan
            f = {"requests": m["ok"], "errors": m["errors"], "error_kinds": m["kinds"],
                 "rps": m["ok"] / wall, "lat_ms": pcts(m["lat"]), "ttfb_ms": pcts(m["ttfb"]),
                 "cpu_s_per_1k_req": 1e3 * m["target_cpu_s"] / m["ok"] if m["ok"] else math.nan,
                 "cpu_s_per_1k_chunks": 1e3 * m["target_cpu_s"] / m["chunks"] if m["chunks"] else math.nan,
                 "rss_mb": m["rss"], "client_cpu_util": m["cpu_s"] / wall, "target_cpu_util": m["target_cpu_s"] / wall,
                 "core0_util": (m["cpu_s"] + m["helper_cpu_s"]) / wall, "wall_s": m["wall_s"],
                 "foreign_cpu_util": m["foreign_cpu_s"] / wall,
                 "lat_quantiles_ms": _q(m["lat"])}
            f["bound"] = _bound(f["client_cpu_util"], f["core0_util"], f["target_cpu_util"])
            if m["gaps"]:
                g = sorted(m["gaps"])
                f["gaps_ms"] = {**pcts(g), "mean": sum(g) / len(g), "max": g[-1], "n": len(g)}
                f["gap_quantiles_ms"] = _q(g)
            if m["delay"]:
                f["chunk_trip_ms"] = pcts(m["delay"])
                e = sorted(m["gap_err"])
                f["gap_error_abs_ms"] = {**pcts(e), "max": e[-1] if e else math.nan, "n": len(e)}
            row[name] = f
        d = row.get("direct")
        for name, f in row.items():
            if d and name != "direct":
                f["added_ms"] = {p: f["lat_ms"][p] - d["lat_ms"][p] for p in ("p50", "p99")}
                f["added_ttfb_ms"] = {p: f["ttfb_ms"][p] - d["ttfb_ms"][p] for p in ("p50", "p99")}
                if "gaps_ms" in f and "gaps_ms" in d:
                    f["added_gap_ms"] = {p: f["gaps_ms"][p] - d["gaps_ms"][p] for p in ("p50", "p99")}
                if "chunk_trip_ms" in f and "chunk_trip_ms" in d:
                    f["added_chunk_trip_ms"] = {p: f["chunk_trip_ms"][p] - d["chunk_trip_ms"][p] for p in ("p50", "p99")}
        res[sc.key] = row
    ratios = _ratios(res)
    return {"meta": meta, "scenarios": [{"key": s.key, "label": s.label, "stream": s.stream, "chunks": s.chunks,
                                         "concurrency": s.concurrency, "gap_ms": s.gap_ms} for s in scenarios],
            "targets": {n: {"note": notes.get(n, ""), "peak_rss_mb": hwm.get(n)} for n in
                        dict.fromkeys(list(names) + [k for k in notes])},
            "results": res, "ratios": ratios, "checks": _checks(res, ratios), "telemetry": telemetry}


def _ratio(a, b):
    return a / b if a and b and not math.isnan(a) and not math.isnan(b) else None


def _ratios(res) -> dict:
    out = {}
    for key, row in res.items():
        a = row.get("aisix", {})
        r = {}
        for other in ("nginx", "litellm", "aisix-notel", "direct"):
            o = row.get(other)
            if a and o:
                r[f"aisix/{other} req/s"] = _ratio(a["rps"], o["rps"])
                r[f"aisix/{other} cpu per req"] = _ratio(a["cpu_s_per_1k_req"], o["cpu_s_per_1k_req"])
        red = row.get("aisix-redis")
        if a and red:
            r["aisix-redis/aisix req/s"] = _ratio(red["rps"], a["rps"])
            r["aisix-redis/aisix cpu per req"] = _ratio(red["cpu_s_per_1k_req"], a["cpu_s_per_1k_req"])
        out[key] = r
    return out


def _checks(res, ratios) -> list:
    """The issue's targets: (name, value, goal, ok or None when it cannot be judged)."""
    def g(key, tgt, *path):
        v = res.get(key, {}).get(tgt)
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return v

    rows = []

    def add(name, v, goal, ok):
        rows.append({"check": name, "value": v, "goal": goal, "pass": None if v is None else ok(v)})

    add("streaming c=32: aisix/nginx req/s", ratios.get("s20-c32", {}).get("aisix/nginx req/s"), ">= 0.60",
        lambda v: v >= 0.6)
    add("streaming c=32: aisix/litellm req/s", ratios.get("s20-c32", {}).get("aisix/litellm req/s"), ">= 30",
        lambda v: v >= 30)
    add("non-streaming c=1: added latency p50 (ms)", g("ns-c1", "aisix", "added_ms", "p50"), "<= 0.3",
        lambda v: v <= 0.3)
    add("non-streaming c=1: added latency p99 (ms)", g("ns-c1", "aisix", "added_ms", "p99"), "<= 1.0",
        lambda v: v <= 1.0)
    add("streaming c=1: added latency p50 (ms)", g("s20-c1", "aisix", "added_ms", "p50"), "<= 0.3",
        lambda v: v <= 0.3)
    add("streaming c=1: added latency p99 (ms)", g("s20-c1", "aisix", "added_ms", "p99"), "<= 1.0",
        lambda v: v <= 1.0)
    add("streaming c=1: added TTFB p50 (ms)", g("s20-c1", "aisix", "added_ttfb_ms", "p50"), "<= 0.2",
        lambda v: v <= 0.2)
    floor = ", ".join(f"{n} {v:.2f}" for n in ("direct", "nginx")
                      if (v := g("gap20-c32", n, "gap_error_abs_ms", "p99")) is not None)
    add("chunk gaps at the client vs the upstream's: p99 |difference| (ms)"
        + (f" [same figure for {floor}]" if floor else ""),
        g("gap20-c32", "aisix", "gap_error_abs_ms", "p99"), "<= 1.0", lambda v: v <= 1.0)
    add("telemetry cost: aisix/aisix-notel req/s, streaming c=32",
        ratios.get("s20-c32", {}).get("aisix/aisix-notel req/s"), ">= 0.90", lambda v: v >= 0.9)
    for key, label in (("ns-c1", "non-streaming"), ("s20-c1", "streaming")):
        red, loc = g(key, "aisix-redis", "lat_ms", "p50"), g(key, "aisix", "lat_ms", "p50")
        add(f"limits in Redis, {label} c=1: aisix-redis p50 - aisix p50 (ms)",
            red - loc if red is not None and loc is not None else None, "<= 0.2", lambda v: v <= 0.2)
    for key in ("ns-c1", "ns-c32", "s20-c32"):
        add(f"limits in Redis, {key}: aisix-redis/aisix CPU per request",
            ratios.get(key, {}).get("aisix-redis/aisix cpu per req"), "<= 1.15", lambda v: v <= 1.15)
    rss = [g(k, "aisix", "rss_mb") for k in ("ns-c128", "s20-c128")]
    rss = [v for v in rss if v is not None]
    add("peak RSS at c=128, aisix (MB)", max(rss) if rss else None, "<= 100", lambda v: v <= 100)
    return rows


def _f(v, nd=2, w=8) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(w)
    return f"{v:{w}.{nd}f}"


def render(rep) -> str:
    """The terminal table: one block per scenario, then the chunk gaps, ratios and checks."""
    out = []
    m = rep["meta"]
    out.append(f"\naisix bench ({'quick' if m['quick'] else 'full'}, {m['elapsed_s']} s, {m['plan']['rounds']} "
               f"interleaved rounds of {m['plan']['duration_s']} s per run; client on cpu {m['client_cpus']}, "
               f"target on cpu {m['target_cpus']}) {m['layout_note']}")
    hdr = (f"{'target':12s} {'req/s':>8s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'+p50':>7s} {'+p99':>7s} "
           f"{'ttfb50':>7s} {'+ttfb50':>7s} {'cpu/1kreq':>9s} {'cpu/1kchk':>9s} {'rssMB':>6s} {'err':>4s} "
           f"{'cli%':>4s} {'tgt%':>4s} {'oth%':>4s} {'limit':>6s}")
    for sc in rep["scenarios"]:
        row = rep["results"].get(sc["key"], {})
        if not row:
            continue
        out.append(f"\n{sc['key']}: {sc['label']}   (latency and ttfb in ms; cpu in s per 1k requests / chunks)")
        out.append(hdr)
        for name, f in row.items():
            a, at = f.get("added_ms", {}), f.get("added_ttfb_ms", {})
            out.append(f"{name:12s} {f['rps']:8.0f} {_f(f['lat_ms']['p50'], 3)} {_f(f['lat_ms']['p90'], 3)} "
                       f"{_f(f['lat_ms']['p99'], 3)} {_f(a.get('p50'), 2, 7)} {_f(a.get('p99'), 2, 7)} "
                       f"{_f(f['ttfb_ms']['p50'], 3, 7)} {_f(at.get('p50'), 3, 7)} "
                       f"{_f(f['cpu_s_per_1k_req'], 3, 9)} {_f(f['cpu_s_per_1k_chunks'], 4, 9)} "
                       f"{f['rss_mb']:6.0f} {f['errors']:4d} {100 * f['client_cpu_util']:4.0f} "
                       f"{100 * f['target_cpu_util']:4.0f} {100 * f.get('foreign_cpu_util', 0):4.0f} "
                       f"{f['bound']:>6s}")
    gap = rep["results"].get("gap20-c32", {})
    if gap:
        out.append("\nchunk timing, upstream sends 20 ms apart (ms): gap = between chunks at the client; trip = "
                   "upstream write -> client read; |gap err| = |client gap - upstream gap|; + = vs direct")
        out.append(f"{'target':12s} {'gap p50':>7s} {'gap p99':>7s} {'trip50':>7s} {'trip99':>7s} {'+trip50':>7s} "
                   f"{'+trip99':>7s} {'err p50':>7s} {'err p99':>7s} {'err max':>7s}")
        for name, f in gap.items():
            gm, tr, at, ge = (f.get(k, {}) for k in ("gaps_ms", "chunk_trip_ms", "added_chunk_trip_ms",
                                                     "gap_error_abs_ms"))
            out.append(f"{name:12s} {_f(gm.get('p50'), 2, 7)} {_f(gm.get('p99'), 2, 7)} {_f(tr.get('p50'), 3, 7)} "
                       f"{_f(tr.get('p99'), 3, 7)} {_f(at.get('p50'), 3, 7)} {_f(at.get('p99'), 3, 7)} "
                       f"{_f(ge.get('p50'), 3, 7)} {_f(ge.get('p99'), 3, 7)} {_f(ge.get('max'), 2, 7)}")
    keys = sorted({k for r in rep["ratios"].values() for k in r if k.endswith("req/s")})
    if keys:
        out.append("\nratios of req/s (and of CPU per request, in brackets)")
        out.append(f"{'scenario':10s} " + " ".join(f"{k.replace(' req/s', ''):>22s}" for k in keys))
        for sk, r in rep["ratios"].items():
            cells = []
            for k in keys:
                v, c = r.get(k), r.get(k.replace("req/s", "cpu per req"))
                cells.append(f"{_f(v, 2, 8)} [{_f(c, 2, 6)}]".rjust(22))
            out.append(f"{sk:10s} " + " ".join(cells))
    out.append("\nchecks (the issue's targets)")
    for c in rep["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["pass"]]
        out.append(f"  {verdict}  {c['check']}: {_f(c['value'], 2, 0).strip()} (goal {c['goal']})")
    limits = [(sk, n) for sk, r in rep["results"].items() for n, f in r.items() if f["bound"] in ("client", "both")]
    if limits:
        out.append("\nthe load generator's side (core 0) was the limit, not the target, in: "
                   + ", ".join(f"{sk}/{n}" for sk, n in limits) + " -- those req/s are a floor for the target")
    oth = [(sk, n, f.get("foreign_cpu_util", 0)) for sk, r in rep["results"].items() for n, f in r.items()]
    noisy = [x for x in oth if x[2] >= 0.15]
    if len(noisy) > 6:
        us = sorted(u for *_, u in oth)
        out.append(f"\nWARNING: other processes (not started by the bench) used >= 15% of a core in {len(noisy)} of "
                   f"{len(oth)} runs (median {100 * us[len(us) // 2]:.0f}%, max {100 * us[-1]:.0f}%): this machine was "
                   "busy, every figure is disturbed; rerun on a quiet machine")
    elif noisy:
        out.append("\nother processes (not started by the bench) used >= 15% of a core during: "
                   + ", ".join(f"{sk}/{n} ({100 * u:.0f}%)" for sk, n, u in noisy) + " -- those figures are disturbed")
    notes = {n: t["note"] for n, t in rep["targets"].items() if t["note"]}
    if notes:
        out.append("\nnotes")
        out += [f"  {n}: {v}" for n, v in notes.items()]
    hwm = {n: t["peak_rss_mb"] for n, t in rep["targets"].items() if t.get("peak_rss_mb")}
    if hwm:
        out.append("peak RSS over the whole run (VmHWM summed over the process tree, MB): "
                   + ", ".join(f"{n} {v:.0f}" for n, v in hwm.items()))
    tel = rep.get("telemetry") or {}
    if tel:
        out.append("telemetry seen: " + ", ".join(f"{k} = {v}" for k, v in tel.items() if k != "prometheus_port"))
    out.append("cli% / tgt% = CPU of the load generator / the target, in % of one core; oth% = CPU of processes "
               "the bench did not start.\nlimit: 'target' = target CPU >= 90% of its core; 'client' = load generator "
               "(or core 0 with the upstream) >= 90%; '-' = neither (paced by latency)")
    return "\n".join(out)


def plot(rep, path: str) -> None:
    """latest.png: latency CDFs (non-streaming c=1, streaming c=32), req/s per scenario, chunk gaps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = rep["results"]
    names = list(dict.fromkeys(n for r in res.values() for n in r))
    colors = {n: c for n, c in zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"])}
    fig, ax = plt.subplots(2, 2, figsize=(14, 9))
    ys = [i / 100 for i in range(101)]
    for a, key in ((ax[0][0], "ns-c1"), (ax[0][1], "s20-c32")):
        for n, f in res.get(key, {}).items():
            if f.get("lat_quantiles_ms"):
                a.plot(f["lat_quantiles_ms"], ys, label=n, color=colors[n])
        a.set_xscale("log")
        a.set_xlabel("latency (ms, log)")
        a.set_ylabel("fraction of requests")
        a.set_title(f"latency CDF: {key}")
        a.grid(alpha=0.3)
        a.legend()
    a = ax[1][0]
    keys = [s["key"] for s in rep["scenarios"] if res.get(s["key"])]
    w = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        a.bar([k + i * w for k in range(len(keys))], [res[k].get(n, {}).get("rps", 0) for k in keys], w,
              label=n, color=colors[n])
    a.set_xticks([k + 0.4 - w / 2 for k in range(len(keys))], keys, rotation=20)
    a.set_yscale("log")
    a.set_ylabel("requests/s (log)")
    a.set_title("throughput per scenario")
    a.grid(alpha=0.3, axis="y")
    a.legend()
    a = ax[1][1]
    for n, f in res.get("gap20-c32", {}).items():
        if f.get("gap_quantiles_ms"):
            a.plot(f["gap_quantiles_ms"], ys, label=n, color=colors[n])
    a.axvline(20, color="k", lw=0.8, ls="--")
    a.set_xlim(0, 45)
    a.set_xlabel("gap between chunks at the client (ms, clipped at 45); upstream: 20 ms")
    a.set_ylabel("fraction of gaps")
    a.set_title("chunk timing: gap20-c32")
    a.grid(alpha=0.3)
    if a.lines:
        a.legend()
    m = rep["meta"]
    fig.suptitle(f"aisix bench {m['started']} ({'quick' if m['quick'] else 'full'})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
