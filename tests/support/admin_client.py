"""An Admin API under test, in this process: the real app over a real store (file or etcd)."""
from __future__ import annotations

import contextlib

from aiohttp.test_utils import TestClient, TestServer

from aisix.config.loader import (
    AdminConfig,
    AdminKey,
    Config,
    DeploymentConfig,
    EtcdConfig,
    FileProviderConfig,
    ObservabilityConfig,
)
from aisix.config.snapshot import SnapshotHolder
from aisix.config.store import create_store
from aisix.gateway import Gateway
from aisix.server.app import create_admin_app_measured
from aisix.telemetry import Telemetry

ADMIN_KEY = "admin-key-for-tests-0001"
OTHER_ADMIN_KEY = "admin-key-for-tests-0002"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def make_config(tmp_path, etcd=None, admin_keys=(ADMIN_KEY, OTHER_ADMIN_KEY), prefix="/aisix") -> Config:
    deployment = DeploymentConfig(
        admin=AdminConfig(admin_key=[AdminKey(key=k) for k in admin_keys]),
        config_provider="etcd" if etcd else "file",
        file=FileProviderConfig(path=str(tmp_path / "resources.json")),
        etcd=EtcdConfig(host=[etcd.endpoint] if etcd else ["127.0.0.1:2379"], prefix=prefix, timeout=2))
    return Config(deployment=deployment)


@contextlib.asynccontextmanager
async def admin_client(config: Config):
    """Yields ``(client, gateway)``; the store is started first and closed after."""
    holder = SnapshotHolder()
    store = create_store(config, holder)
    await store.start()
    telemetry = Telemetry(ObservabilityConfig(enabled=False), "admin-test")  # measured by the real middleware, not exported
    gateway = Gateway(config=config, holder=holder, store=store, pipeline=None, telemetry=telemetry, pool=None)
    client = TestClient(TestServer(create_admin_app_measured(gateway)))
    await client.start_server()
    try:
        yield client, gateway
    finally:
        await client.close()
        await store.close()
