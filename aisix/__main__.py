"""Command line: ``python -m aisix serve [--config FILE] [--data-dir DIR]``."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aisix", description="An OpenAI-compatible AI gateway.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="YAML config file (default: the embedded default, a mock model)")
    s.add_argument("--data-dir", default="./aisix-data", help="where the embedded default keeps its data")
    s.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--listen", help="proxy host:port (overrides server.proxy.listen)")
    s.add_argument("--admin-listen", help="Admin API host:port (overrides server.admin.listen)")
    s.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.config:
            config, creds = load_config(args.config), None
        else:
            config, creds = embedded_default(args.data_dir)
        if args.listen:
            config.server.proxy = Listen(listen=args.listen)
        if args.admin_listen:
            config.server.admin = Listen(listen=args.admin_listen)
    except (ConfigError, ValueError) as e:
        print(f"aisix: {e}", file=sys.stderr)
        return 2
    import uvloop

    from .server import serve
    try:
        uvloop.run(serve(config, banner=_banner(creds)))
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
