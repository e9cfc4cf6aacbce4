"""An immutable view of the configuration that the proxy reads.

A request takes ``holder.current`` once and keeps it to the end, so a reload (an
atomic swap of the reference) never changes what a request already started with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from aisix.config.resources import ApiKey, Model, hash_key


def _secrets_of(pc) -> tuple[str, ...]:
    """A provider config's secrets: its ``api_key`` and the password in its ``api_base`` (``user:pw@``)."""
    out = (pc.api_key,) if pc.api_key else ()
    if pc.api_base and "@" in pc.api_base:
        password = urlsplit(pc.api_base).password
        if password:
            out += (password,)
    return out

@dataclass(frozen=True, slots=True)
class Snapshot:
    """Models by ``name`` and API keys by ``key_hash`` (the SHA-256 of the secret, hex: a presented
    key is hashed once and looked up with one dict access); ``revision`` counts swaps; ``secrets``
    every provider key in it (for :func:`~aisix.proxy.redact.redact`). Client keys are not among them:
    the gateway holds only their hashes (the proxy adds the request's own bearer itself)."""

    models: Mapping[str, Model] = field(default_factory=lambda: MappingProxyType({}))
    keys: Mapping[str, ApiKey] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0
    secrets: tuple[str, ...] = ()

    @classmethod
    def build(cls, models: Iterable[Model], keys: Iterable[ApiKey], revision: int = 0) -> "Snapshot":
        models = MappingProxyType({m.name: m for m in models})
        keys = MappingProxyType({k.key_hash: k for k in keys})
        secrets = tuple(s for m in models.values() for t in m.targets for s in _secrets_of(t.provider_config))
        return cls(models, keys, revision, secrets)

    def key_for(self, secret: str) -> ApiKey | None:
        """The API key whose secret is ``secret``, or None."""
        return self.keys.get(hash_key(secret))


class SnapshotHolder:
    """Holds the current :class:`Snapshot`; ``swap`` replaces it atomically (one reference write)
    and tells the listeners (e.g. the rate limiter, to drop counts of deleted entities)."""

    def __init__(self, snapshot: Snapshot | None = None):
        self.current: Snapshot = snapshot or Snapshot()
        self._listeners: list[Callable[[Snapshot, Snapshot], None]] = []

    def swap(self, models: Iterable[Model], keys: Iterable[ApiKey]) -> Snapshot:
        old = self.current
        new = Snapshot.build(models, keys, old.revision + 1)
        self.current = new
        for listener in self._listeners:
            listener(old, new)
        return new

    def on_swap(self, listener: Callable[[Snapshot, Snapshot], None]) -> None:
        """Call ``listener(old, new)`` after each swap."""
        self._listeners.append(listener)
