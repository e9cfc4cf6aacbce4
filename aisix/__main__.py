"""Command line: ``python -m aisix serve [--config FILE] [--data-dir DIR]``."""
from __future__ import annotations

import argparse
import logging
import sys

from aisix import __version__
from aisix.config.loader import ConfigError, embedded_default, load_config, parse_listen
from aisix.config.store import StoreError


def _telemetry_line(obs) -> str:
    """Where telemetry goes, for the start-up banner."""
    if not obs.enabled:
        return "disabled (observability.enabled: false or OTEL_SDK_DISABLED=true)"
    metrics = obs.metrics.otlp_endpoint or "no push"
    if obs.metrics.prometheus is not None:
        metrics += f", scrape at http://{obs.metrics.prometheus.listen}/metrics"
    return f"metrics → {metrics}, traces → {obs.traces.otlp_endpoint or 'off'}"


def _banner(creds):
    def show(gateway):
        cfg = gateway.config
        proxy, admin = cfg.server.proxy.listen, cfg.server.admin.listen
        lines = [f"aisix serving: proxy http://{proxy}  admin http://{admin}/aisix/admin  (config: {cfg.source})"]
        obs = cfg.observability
        lines.append(f"telemetry: {_telemetry_line(obs)}")
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
                   help="worker processes sharing the proxy port (SO_REUSEPORT); worker 0 also serves the Admin API; "
                   "a worker that dies is restarted")
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--listen", help="proxy host:port (overrides server.proxy.listen)")
    s.add_argument("--admin-listen", help="Admin API host:port (overrides server.admin.listen)")
    s.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="logging threshold (DEBUG adds one line per request)")
    args = ap.parse_args(argv)
    # the level is aisix's own; libraries speak from INFO up (their DEBUG would drown the per-request line)
    logging.basicConfig(level=max(logging.getLevelName(args.log_level), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aisix").setLevel(args.log_level)
    try:
        if args.config:
            config, creds = load_config(args.config), None
        else:
            config, creds = embedded_default(args.data_dir)
        for name, value in (("proxy", args.listen), ("admin", args.admin_listen)):
            if value:  # the listener's other settings stay as the file has them
                try:
                    parse_listen(value)
                except ValueError as e:
                    raise ConfigError(f"--{name.replace('proxy', 'listen').replace('admin', 'admin-listen')}: {e}") from None
                old = getattr(config.server, name)
                setattr(config.server, name, type(old).model_validate({**old.model_dump(), "listen": value}))
    except (ConfigError, ValueError) as e:
        print(f"aisix: {e}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("aisix: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_index is None:
        from aisix.supervisor import supervise
        return supervise(args.workers, argv if argv is not None else sys.argv[1:])
    import uvloop

    from aisix.server.lifecycle import serve
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


if __name__ == "__main__":
    sys.exit(main())
