"""An immutable view of the configuration that the proxy reads.

A request takes ``holder.current`` once and keeps it to the end, so a reload (an
atomic swap of the reference) never changes what a request already started with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from .resources import ApiKey, Model


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Models by ``name`` and API keys by ``key``; ``revision`` counts swaps; ``secrets`` every
    provider and client key in it (for :func:`~aisix.redact.redact`)."""

    models: Mapping[str, Model] = field(default_factory=lambda: MappingProxyType({}))
    keys: Mapping[str, ApiKey] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0
    secrets: tuple[str, ...] = ()

    @classmethod
    def build(cls, models: Iterable[Model], keys: Iterable[ApiKey], revision: int = 0) -> "Snapshot":
        models = MappingProxyType({m.name: m for m in models})
        keys = MappingProxyType({k.key: k for k in keys})
        secrets = tuple(k for k in keys) + tuple(m.provider_config.api_key for m in models.values()
                                                 if m.provider_config.api_key)
        return cls(models, keys, revision, secrets)


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
