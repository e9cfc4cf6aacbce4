"""Configuration stores: where models and API keys live and how changes reach the proxy."""
from aisix.config.store.base import ConfigStore, ConflictError, StoreError, StoreUnavailable

__all__ = ["ConfigStore", "ConflictError", "StoreError", "StoreUnavailable", "create_store"]


def create_store(config, holder, follower: bool = False) -> ConfigStore:
    """The store that ``deployment.config_provider`` names (``file`` or ``etcd``). ``follower``:
    this process is an extra worker; with ``file`` it reads the document worker 0 owns."""
    provider = config.deployment.config_provider
    if provider == "file":
        from aisix.config.store.file import FileFollower, FileStore
        if follower:
            return FileFollower(config.deployment.file.path, holder)
        return FileStore(config.deployment.file.path, holder)
    if provider == "etcd":
        from aisix.config.store.etcd import EtcdStore
        return EtcdStore(config.deployment.etcd, holder)
    raise StoreError(f"unknown config_provider {provider!r}")
