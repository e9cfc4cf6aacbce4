"""One gateway process from start to stop: assembly, listeners, signals, graceful shutdown.

Start-up: config → store (load, upsert the file's resources) → telemetry → listeners.
Shutdown on SIGTERM/SIGINT: stop accepting, let in-flight requests (streams too) finish up to
``server.shutdown_grace_ms``, then drain the telemetry batcher and flush both exporters.
SIGHUP: worker 0 re-reads the config file's ``models``/``apikeys`` (:func:`reload_resources`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from aiohttp import web

from aisix.config.loader import Config, ConfigError, load_config, parse_listen
from aisix.config.snapshot import SnapshotHolder
from aisix.config.store import StoreError, create_store
from aisix.gateway import Gateway
from aisix.hooks.pipeline import Pipeline
from aisix.server.app import create_admin_app_measured, create_proxy_app
from aisix.server.protocol import Runner
from aisix.telemetry import Telemetry
from aisix.telemetry.otel import instance_id
from aisix.upstream.pool import UpstreamPool

log = logging.getLogger("aisix")

#: After the grace, the longest wait for cancelled requests to unwind before telemetry is flushed (s).
SHUTDOWN_SLACK_S = 1.0


def build_pipeline(config: Config, holder: SnapshotHolder, telemetry: Telemetry) -> Pipeline:
    """The hooks: the rate limiter, on this process's counters or on Redis
    (``deployment.rate_limit_store``)."""
    store = config.deployment.rate_limit_store
    if store.kind == "redis":
        from aisix.hooks.ratelimit_redis import RedisRateLimitHook
        return Pipeline([RedisRateLimitHook(store, holder, telemetry.count_ratelimit_store_error)])
    from aisix.hooks.ratelimit import RateLimitHook
    return Pipeline([RateLimitHook(holder, clock=time.time)])


async def start_gateway(config: Config, worker: int = 0) -> Gateway:
    """Load the store (raising StoreError/ConfigError on a bad one) and build the gateway state.

    Worker 0 (the only one without ``--workers``) owns the store and upserts the config file's
    resources; other workers follow what it writes."""
    holder = SnapshotHolder()
    store = create_store(config, holder, follower=worker > 0)
    await store.start()
    if worker == 0:
        try:
            await store.seed(config.models, config.apikeys)
        except BaseException:
            await store.close()
            raise
    _, port = parse_listen(config.server.proxy.listen)
    try:
        telemetry = Telemetry(config.observability, instance_id(port, worker), worker=worker)
        if telemetry.enabled:
            telemetry.prices.preload(holder.current.models.values())
    except BaseException:  # e.g. the access log or the scrape endpoint can't be opened: a ConfigError
        await store.close()
        raise
    gateway = Gateway(config, holder, store, build_pipeline(config, holder, telemetry), telemetry, UpstreamPool())
    if config.deployment.rate_limit_store.kind == "redis":  # deployments' own limits are counted there too
        gateway.router.shared = gateway.pipeline.hooks[0]
    holder.on_swap(lambda old, new: gateway.router.prune(new.models.values()))
    return gateway


class Server:
    """Runs the proxy and Admin API listeners of one gateway process."""

    def __init__(self, gateway: Gateway, reuse_port: bool = False, admin: bool = True):
        self.gateway = gateway
        self.reuse_port = reuse_port
        self.admin = admin
        self.runners: list[web.AppRunner] = []

    async def start(self) -> None:
        cfg = self.gateway.config
        grace = cfg.server.shutdown_grace_ms / 1000
        apps = [(create_proxy_app(self.gateway), cfg.server.proxy.listen, cfg.server.proxy.client_write_timeout_ms / 1000)]
        admin = create_admin_app_measured(self.gateway) if self.admin else None
        if admin is not None:
            apps.append((admin, cfg.server.admin.listen, None))
        self.gateway.telemetry.start()
        try:
            for app, listen, write_timeout in apps:
                runner = Runner(app, handle_signals=False, access_log=None, shutdown_timeout=grace,
                                 handler_cancellation=True, auto_decompress=False, keepalive_timeout=75,
                                 write_timeout=write_timeout)
                await runner.setup()
                self.runners.append(runner)
                host, port = parse_listen(listen)
                await web.TCPSite(runner, host, port, reuse_port=self.reuse_port or None).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting, wait for in-flight requests (up to the grace), then flush telemetry.
        Requests still running when the grace runs out are cancelled then (not after a second
        wait, as aiohttp's ``shutdown_timeout`` alone would do) and measured as 503."""
        self.gateway.draining = True
        cleanups = [asyncio.ensure_future(r.cleanup()) for r in self.runners]
        self.runners.clear()
        if cleanups:
            _, pending = await asyncio.wait(cleanups, timeout=self.gateway.config.server.shutdown_grace_ms / 1000)
            if pending:
                for task in list(self.gateway.inflight):
                    task.cancel()
                await asyncio.wait(pending, timeout=SHUTDOWN_SLACK_S)
            for t in cleanups:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.warning("stopping a listener failed: %r", t.exception())
        await self.gateway.pool.close()
        await self.gateway.pipeline.aclose()
        await self.gateway.store.close()
        await self.gateway.telemetry.stop()


async def reload_resources(gateway: Gateway) -> bool:
    """Re-read the config file (``gateway.config.source``) and upsert its ``models`` and ``apikeys``
    into the store, as at start-up (by name / by key; nothing is deleted, nothing else of the file
    is applied). The new snapshot serves from the next request; requests and connections under way
    are untouched. A file that no longer loads, or a store that refuses the write, is logged and
    the current configuration kept. Returns whether the upsert happened."""
    source = gateway.config.source
    if source == "embedded default":
        log.info("SIGHUP: no config file to re-read (embedded default)")
        return False
    try:
        fresh = load_config(source)
        await gateway.store.seed(fresh.models, fresh.apikeys)
    except (ConfigError, StoreError) as e:
        log.error("SIGHUP: keeping the current configuration: %s", e)
        return False
    log.warning("SIGHUP: re-read %s: %d models and %d API keys upserted", source, len(fresh.models),
                len(fresh.apikeys))
    return True


async def serve(config: Config, banner=None, worker: int = 0, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. SIGHUP: worker 0 runs
    :func:`reload_resources`; other workers ignore it (they follow what worker 0 writes)."""
    gateway = await start_gateway(config, worker)
    server = Server(gateway, reuse_port, admin=worker == 0)
    await server.start()  # on failure it has already stopped what it started
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_hup() -> None:
        if worker == 0:
            task = loop.create_task(reload_resources(gateway))
            reloads.add(task)
            task.add_done_callback(reloads.discard)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if banner:
        banner(gateway)
    if fd := os.environ.pop("AISIX_READY_FD", None):  # tell a --workers supervisor we listen
        os.write(int(fd), b"1")
        os.close(int(fd))
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (up to %.0f ms)", config.server.shutdown_grace_ms)
    await server.stop()
    log.info("stopped")
