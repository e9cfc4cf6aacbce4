"""Configuration stores: where models and API keys live and how changes reach the proxy."""
from .base import ConfigStore, ConflictError, StoreError, StoreUnavailable

__all__ = ["ConfigStore", "ConflictError", "StoreError", "StoreUnavailable", "create_store"]


def create_store(config, holder) -> ConfigStore:
    """The store that ``deployment.config_provider`` names (``file`` or ``etcd``)."""
    provider = config.deployment.config_provider
    if provider == "file":
        from .file import FileStore
        return FileStore(config.deployment.file.path, holder)
    if provider == "etcd":
        from .etcd import EtcdStore
        return EtcdStore(config.deployment.etcd, holder)
    raise StoreError(f"unknown config_provider {provider!r}")
