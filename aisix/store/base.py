"""The interface every configuration store implements.

A store keeps every resource as ``{kind: {id: dict}}`` (kinds: ``models``, ``apikeys``),
persists writes its own way, and after each change publishes a new immutable
:class:`~aisix.snapshot.Snapshot` through the :class:`~aisix.snapshot.SnapshotHolder`.
"""
from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod

from ..resources import SCHEMAS, UNIQUE_FIELD
from ..snapshot import SnapshotHolder

log = logging.getLogger("aisix.store")


class StoreError(Exception):
    """The store cannot be read or written (names the file or endpoint and the cause)."""


class ConfigStore(ABC):
    """Resources in memory plus a persistence back end.

    Subclasses implement :meth:`start` (load all, begin watching), :meth:`_persist_put`,
    :meth:`_persist_delete` and :meth:`close`. Reads are served from memory.
    """

    def __init__(self, holder: SnapshotHolder):
        self.holder = holder
        self.data: dict[str, dict[str, dict]] = {kind: {} for kind in SCHEMAS}

    @abstractmethod
    async def start(self) -> None:
        """Load every resource and publish the first snapshot. Raises :class:`StoreError`."""

    async def close(self) -> None:
        """Stop watching and release connections."""

    @abstractmethod
    async def _persist_put(self, kind: str, id: str, obj: dict) -> None: ...

    @abstractmethod
    async def _persist_delete(self, kind: str, id: str) -> None: ...

    # -- reads --------------------------------------------------------------
    def list(self, kind: str) -> list[dict]:
        return list(self.data[kind].values())

    def get(self, kind: str, id: str) -> dict | None:
        return self.data[kind].get(id)

    def find_by_unique(self, kind: str, value: str) -> dict | None:
        """The resource of ``kind`` whose unique field (model ``name``, key ``key``) is ``value``."""
        field = UNIQUE_FIELD[kind]
        for obj in self.data[kind].values():
            if obj.get(field) == value:
                return obj
        return None

    # -- writes -------------------------------------------------------------
    async def put(self, kind: str, id: str, obj: dict) -> bool:
        """Create or replace resource ``id`` (``obj`` already validated). Returns True if created."""
        obj = {**obj, "id": id}
        created = id not in self.data[kind]
        await self._persist_put(kind, id, obj)
        self.data[kind][id] = obj
        self.publish()
        return created

    async def delete(self, kind: str, id: str) -> bool:
        """Delete resource ``id``. Returns False if there was none."""
        if id not in self.data[kind]:
            return False
        await self._persist_delete(kind, id)
        self.data[kind].pop(id, None)
        self.publish()
        return True

    async def upsert_by_unique(self, kind: str, obj: dict) -> str:
        """Upsert by model ``name`` / key ``key`` (the config file's start-up resources). Returns the id."""
        existing = self.find_by_unique(kind, obj[UNIQUE_FIELD[kind]])
        rid = existing["id"] if existing else str(uuid.uuid4())
        await self.put(kind, rid, obj)
        return rid

    def publish(self) -> None:
        """Build a snapshot from ``self.data`` and swap it in. Entries that fail validation
        (e.g. written straight into etcd by hand) are skipped with a warning."""
        parsed = {}
        for kind, schema in SCHEMAS.items():
            items = []
            for rid, obj in self.data[kind].items():
                try:
                    items.append(schema.model_validate({**obj, "id": rid}))
                except Exception as e:  # noqa: BLE001 - one bad entry must not stop the others
                    log.warning("skipping invalid %s %s: %s", kind, rid, str(e).splitlines()[0])
            parsed[kind] = items
        self.holder.swap(parsed["models"], parsed["apikeys"])
