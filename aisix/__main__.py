"""Command line: ``python -m aisix serve [--config FILE] [--data-dir DIR]``."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import ConfigError, Listen, embedded_default, load_config
from .store import StoreError


def _banner(creds):
    def show(gateway):
        cfg = gateway.config
        proxy, admin = cfg.server.proxy.listen, cfg.server.admin.listen
        lines = [f"aisix serving: proxy http://{proxy}  admin http://{admin}/aisix/admin  (config: {cfg.source})"]
        obs = cfg.observability
        lines.append(f"telemetry: {'metrics → ' + obs.metrics.otlp_endpoint + ', traces → ' + obs.traces.otlp_endpoint if obs.enabled else 'disabled (OTEL_SDK_DISABLED)'}")
        if creds:
            lines += [
                f"admin key:  {creds['admin_key']}",
                f"client key: {creds['client_key']}  (model: mock)",
                "try:",
                f"  curl -N http://{proxy}/v1/chat/completions -H 'Authorization: Bearer {creds['client_key']}' "
                "-H 'Content-Type: application/json' "
                "-d '{\"model\": \"mock\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'",
            ]
        print("\n".join(lines), flush=True)
    return show


#: The --log-level values (case-insensitive), the stdlib logging level names.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aisix", description="An OpenAI-compatible AI gateway.")
    ap.add_argument("--version", action="version", version=f"aisix {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="YAML config file (default: the embedded default, a mock model)")
    s.add_argument("--data-dir", default="./aisix-data", help="where the embedded default keeps its data")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the proxy port (SO_REUSEPORT); worker 0 also serves the Admin API")
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--listen", help="proxy host:port (overrides server.proxy.listen)")
    s.add_argument("--admin-listen", help="Admin API host:port (overrides server.admin.listen)")
    s.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="logging threshold (DEBUG adds one line per request)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.config:
            config, creds = load_config(args.config), None
        else:
            config, creds = embedded_default(args.data_dir)
        if args.listen:
            config.server.proxy = config.server.proxy.model_copy(update={"listen": Listen(listen=args.listen).listen})
        if args.admin_listen:
            config.server.admin = config.server.admin.model_copy(update={"listen": Listen(listen=args.admin_listen).listen})
    except (ConfigError, ValueError) as e:
        print(f"aisix: {e}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("aisix: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_index is None:
        return supervise(args.workers, argv if argv is not None else sys.argv[1:])
    import uvloop

    from .server import serve
    worker = args.worker_index or 0
    try:
        uvloop.run(serve(config, banner=_banner(creds) if worker == 0 else None, worker=worker,
                         reuse_port=args.worker_index is not None))
    except (ConfigError, StoreError) as e:
        print(f"aisix: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"aisix: cannot start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def supervise(n: int, argv: list[str]) -> int:
    """Run ``n`` copies of this command as workers on one port (``SO_REUSEPORT``); pass SIGTERM and
    SIGINT on to them and wait. Returns the first non-zero exit code, else 0."""
    import os
    import select
    import signal
    import subprocess
    import time

    # Worker 0 first: it owns the store and seeds it; the others start once it says it is ready
    # (one byte on a pipe), so no worker ever serves an empty configuration. Signals are passed on
    # from the start, so a SIGTERM during start-up leaves no worker behind.
    cmd = [sys.executable, "-m", "aisix", *argv, "--worker-index"]
    procs: list[subprocess.Popen] = []
    stopping: list[int] = []

    def forward(sig, _frame):
        stopping.append(sig)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def start(i: int) -> bool:
        if stopping:
            return False
        r, w = os.pipe()
        procs.append(subprocess.Popen([*cmd, str(i)], pass_fds=(w,), env={**os.environ, "AISIX_READY_FD": str(w)}))
        os.close(w)
        ready = bool(select.select([r], [], [], 120)[0] and os.read(r, 1))
        os.close(r)
        return ready and not stopping

    if not start(0) or not all(start(i) for i in range(1, n)):
        asked_to_stop = bool(stopping)
        forward(signal.SIGTERM, None)
        codes = [p.wait() for p in procs]
        return 0 if asked_to_stop else next((c for c in codes if c), 1)
    print(f"aisix: all {n} workers ready", flush=True)

    code = 0
    while any(p.poll() is None for p in procs):
        for p in procs:
            if p.poll() not in (None, 0) and code == 0:
                code = p.returncode  # one worker failed: stop the others
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return code or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
