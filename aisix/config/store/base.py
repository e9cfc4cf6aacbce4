"""The interface every configuration store implements.

A store keeps every resource as ``{kind: {id: dict}}`` (kinds: ``models``, ``apikeys``),
persists writes its own way, and after each change publishes a new immutable
:class:`~aisix.config.snapshot.Snapshot` through the :class:`~aisix.config.snapshot.SnapshotHolder`.

API keys are kept as :class:`~aisix.config.resources.ApiKey` stores them: ``key_hash`` (SHA-256) and
``key_prefix``, never the secret. One written in plaintext by an older aisix is hashed when it is
read (:func:`hash_plaintext_keys`), and the back ends write it back hashed at start-up.

Writes are serialised by one lock per store and keep each kind's unique field (model
``name``, key ``key_hash``) unique: a clash raises :class:`ConflictError`. A back end that other
processes also write (etcd) re-checks against its own fresh copy in :meth:`ConfigStore._write`.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from abc import ABC, abstractmethod
from typing import Callable

from pydantic import ValidationError

from aisix.config.resources import SCHEMAS, UNIQUE_FIELD, describe_validation_error, stored_api_key
from aisix.config.snapshot import SnapshotHolder

log = logging.getLogger("aisix.store")

#: ``choose(existing: {id: obj}) -> id``: picks the id a write goes to, given the kind's resources.
ChooseId = Callable[[dict[str, dict]], str]


class StoreError(Exception):
    """The store cannot be read or written (names the file or endpoint and the cause)."""


class StoreUnavailable(StoreError):
    """The back end cannot be reached right now (etcd down); reads still serve the last copy."""


class ConflictError(StoreError):
    """Another resource already holds this unique value (model ``name``, API key ``key``);
    ``field`` is the field the writer set (``key`` for an API key, whose hash is what clashed)."""

    def __init__(self, kind: str, field: str, other_id: str):
        field = "key" if field == "key_hash" else field
        self.kind, self.field, self.other_id = kind, field, other_id
        what = "a model with this name" if kind == "models" else "an API key with this key"
        super().__init__(f"field `{field}`: {what} already exists (id {other_id})")


def check_unique(kind: str, existing: dict[str, dict], rid: str, obj: dict) -> None:
    """Raise :class:`ConflictError` if a resource other than ``rid`` holds ``obj``'s unique value."""
    field = UNIQUE_FIELD[kind]
    value = obj.get(field)
    for other_id, other in existing.items():
        if other_id != rid and other.get(field) == value:
            raise ConflictError(kind, field, other_id)


def hash_plaintext_keys(data: dict[str, dict[str, dict]]) -> list[str]:
    """Replace, in place, every API key of ``data`` (``{kind: {id: dict}}``) stored in plaintext
    by an older aisix with its hashed shape (:func:`~aisix.config.resources.stored_api_key`). Returns the
    ids replaced, so the caller can write them back."""
    keys = data.get("apikeys", {})
    done = []
    for rid, obj in keys.items():
        if isinstance(obj, dict) and (new := stored_api_key(obj)) is not obj:
            keys[rid] = new
            done.append(rid)
    return done


def upsert_id(kind: str, obj: dict) -> ChooseId:
    """The id of the resource holding ``obj``'s unique value, or a new UUID."""
    field = UNIQUE_FIELD[kind]

    def choose(existing: dict[str, dict]) -> str:
        for rid, other in existing.items():
            if other.get(field) == obj.get(field):
                return rid
        return str(uuid.uuid4())
    return choose


class ConfigStore(ABC):
    """Resources in memory plus a persistence back end.

    Subclasses implement :meth:`start` (load all, begin watching), :meth:`_persist_put`,
    :meth:`_persist_delete` and :meth:`close`. Reads are served from memory.
    """

    def __init__(self, holder: SnapshotHolder):
        self.holder = holder
        self.data: dict[str, dict[str, dict]] = {kind: {} for kind in SCHEMAS}
        self._write_lock = asyncio.Lock()
        # (kind, id) -> (the dict validated, its parsed resource or None): publish re-validates only changes
        self._parsed: dict[tuple[str, str], tuple[dict, object]] = {}

    @abstractmethod
    async def start(self) -> None:
        """Load every resource and publish the first snapshot. Raises :class:`StoreError`."""

    async def close(self) -> None:
        """Stop watching and release connections."""

    @abstractmethod
    async def _persist_put(self, kind: str, id: str, obj: dict) -> None: ...

    @abstractmethod
    async def _persist_delete(self, kind: str, id: str) -> bool:
        """Delete from the back end; returns whether it was there."""

    # -- reads --------------------------------------------------------------
    def list(self, kind: str) -> list[dict]:
        return list(self.data[kind].values())

    def get(self, kind: str, id: str) -> dict | None:
        return self.data[kind].get(id)

    def find_by_unique(self, kind: str, value: str) -> dict | None:
        """The resource of ``kind`` whose unique field (model ``name``, key ``key_hash``) is ``value``."""
        field = UNIQUE_FIELD[kind]
        for obj in self.data[kind].values():
            if obj.get(field) == value:
                return obj
        return None

    # -- writes -------------------------------------------------------------
    async def put(self, kind: str, id: str, obj: dict) -> bool:
        """Create or replace resource ``id`` (``obj`` already validated). Returns True if created.
        Raises :class:`ConflictError` if another resource holds its name/key. An API key given with
        its plaintext ``key`` is stored hashed."""
        obj = stored_api_key(obj) if kind == "apikeys" else obj
        async with self._write_lock:
            rid, stored, created = await self._write(kind, lambda _existing: id, obj)
            self._apply(kind, rid, stored)
        return created

    async def upsert_by_unique(self, kind: str, obj: dict) -> str:
        """Upsert by model ``name`` / key ``key_hash`` (the config file's start-up resources). Returns the id.
        Writes nothing when the stored resource is already equal."""
        obj = stored_api_key(obj) if kind == "apikeys" else obj
        async with self._write_lock:
            rid, stored, _ = await self._write(kind, upsert_id(kind, obj), obj)
            self._apply(kind, rid, stored)
        return rid

    async def delete(self, kind: str, id: str) -> bool:
        """Delete resource ``id``. Returns False if there was none."""
        async with self._write_lock:
            existed = await self._persist_delete(kind, id)
            if self.data[kind].pop(id, None) is not None or existed:
                self.publish()
        return existed

    async def seed(self, models, apikeys) -> None:
        """Upsert the config file's ``models`` (:class:`~aisix.config.resources.Model`) by name and
        ``apikeys`` (:class:`~aisix.config.resources.ApiKeyWrite`, ``key`` set) by the key's hash."""
        for model in models:
            await self.upsert_by_unique("models", model.model_dump(mode="json", exclude_unset=True, exclude={"id"}))
        for key in apikeys:
            await self.upsert_by_unique("apikeys", key.stored(key.key))

    async def _write(self, kind: str, choose: ChooseId, obj: dict) -> tuple[str, dict, bool]:
        """Pick the id, check uniqueness, persist. Returns ``(id, stored obj, created)``.
        Called under the write lock; back ends shared with other writers override it."""
        existing = self.data[kind]
        rid = choose(existing)
        stored = {**obj, "id": rid}
        check_unique(kind, existing, rid, stored)
        if existing.get(rid) != stored:
            await self._persist_put(kind, rid, stored)
        return rid, stored, rid not in existing

    def _apply(self, kind: str, rid: str, obj: dict) -> None:
        if self.data[kind].get(rid) != obj:
            self.data[kind][rid] = obj
            self.publish()

    def publish(self) -> None:
        """Build a snapshot from ``self.data`` and swap it in. Entries that fail validation
        (e.g. written straight into etcd by hand) are skipped with one warning each."""
        parsed: dict[str, list] = {}
        cache: dict[tuple[str, str], tuple[dict, object]] = {}
        for kind, schema in SCHEMAS.items():
            items, seen = [], {}
            field = UNIQUE_FIELD[kind]
            for rid, obj in self.data[kind].items():
                hit = self._parsed.get((kind, rid))
                if hit is not None and hit[0] is obj:
                    item = hit[1]
                else:
                    item = self._validate(schema, kind, rid, obj)
                cache[(kind, rid)] = (obj, item)
                if item is None:
                    continue
                value = getattr(item, field)
                if value in seen:
                    log.warning("%s %s and %s share one %s; serving %s", kind, seen[value], rid, field, seen[value])
                    continue
                seen[value] = rid
                items.append(item)
            parsed[kind] = items
        self._parsed = cache
        self.holder.swap(parsed["models"], parsed["apikeys"])

    @staticmethod
    def _validate(schema, kind: str, rid: str, obj):
        if not isinstance(obj, dict):
            log.warning("skipping invalid %s %s: not a JSON object", kind, rid)
            return None
        try:
            return schema.model_validate({**obj, "id": rid})
        except ValidationError as e:
            log.warning("skipping invalid %s %s: %s", kind, rid, describe_validation_error(e)[0])
            return None
