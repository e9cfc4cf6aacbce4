"""The state one gateway process shares between its apps (set at start-up, read per request)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from aisix.config.loader import Config
from aisix.config.snapshot import SnapshotHolder
from aisix.config.store import ConfigStore
from aisix.hooks.pipeline import Pipeline
from aisix.proxy.routing import Router
from aisix.telemetry import Telemetry
from aisix.upstream.pool import UpstreamPool


@dataclass(eq=False)
class Gateway:
    """Everything a handler needs: config, the live snapshot, the store, hooks, telemetry, upstreams."""

    config: Config
    holder: SnapshotHolder
    store: ConfigStore
    pipeline: Pipeline
    telemetry: Telemetry
    pool: UpstreamPool
    draining: bool = False  # set at shutdown: a cancellation from now on is the server's doing
    router: Router = field(default_factory=Router)  # deployments' health, this process's view
    #: the tasks handling requests now (the middleware keeps it); cancelled when the grace runs out
    inflight: set[asyncio.Task] = field(default_factory=set)


GATEWAY = web.AppKey("gateway", Gateway)
