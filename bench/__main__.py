"""``python -m bench [--quick] [--peers] [--only T,T] [--scenarios K,K]``: run the benchmark (see bench/README.md)."""
from __future__ import annotations

import argparse
import importlib.util
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description="aisix vs direct, nginx (and LiteLLM)")
    ap.add_argument("--quick", action="store_true", help="short runs, under a minute")
    ap.add_argument("--peers", action="store_true", help="also LiteLLM's proxy (installed once into bench/.venv-litellm)")
    ap.add_argument("--only", default="", help="comma-separated targets (direct,aisix,aisix-notel,nginx,litellm)")
    ap.add_argument("--scenarios", default="", help="comma-separated scenario keys (ns-c1,s20-c1,...; default: all)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results)")
    a = ap.parse_args(argv)
    missing = [m for m in ("httptools", "psutil", "matplotlib", "orjson") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench needs {', '.join(missing)}: {sys.executable} -m pip install {' '.join(missing)}",
              file=sys.stderr)
        return 2
    from bench.driver import run
    only = [t.strip() for t in a.only.split(",") if t.strip()] or None
    if only and "litellm" in only:
        a.peers = True
    scenarios = [k.strip() for k in a.scenarios.split(",") if k.strip()] or None
    try:
        run(quick=a.quick, peers=a.peers, only=only, out_dir=a.out, scenarios=scenarios)
    except ValueError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
