"""The embedded store: one JSON document on disk, written atomically.

Document shape: ``{"models": {id: {...}}, "apikeys": {id: {...}}}``. A write goes to a
temp file in the same folder, is fsynced, renamed over the document, and the folder is
fsynced (POSIX rename is atomic), so a crash leaves either the old or the new content.
"""
from __future__ import annotations

import asyncio
import os
import tempfile

import orjson

from ..resources import SCHEMAS
from .base import ConfigStore, StoreError


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically (temp + fsync + rename + fsync dir)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".resources.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_document(path: str) -> dict[str, dict[str, dict]]:
    """Read the document; a missing file is empty. Raises :class:`StoreError` naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {kind: {} for kind in SCHEMAS}
    except OSError as e:
        raise StoreError(f"{path}: cannot read the resources file: {e.strerror}") from e
    try:
        doc = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as e:
        raise StoreError(f"{path}: corrupt resources file (not valid JSON: {e}); "
                         "fix or move it away, it is left untouched") from e
    if not isinstance(doc, dict) or any(not isinstance(doc.get(k, {}), dict) for k in SCHEMAS):
        raise StoreError(f"{path}: corrupt resources file (expected an object with "
                         "`models` and `apikeys` objects); it is left untouched")
    return {kind: dict(doc.get(kind, {})) for kind in SCHEMAS}


class FileStore(ConfigStore):
    """Resources in one local JSON file (``deployment.file.path``)."""

    def __init__(self, path: str, holder):
        super().__init__(holder)
        self.path = path
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.data = read_document(self.path)
        self.publish()

    async def _save(self, data: dict) -> None:
        blob = orjson.dumps(data, option=orjson.OPT_INDENT_2)
        async with self._lock:
            await asyncio.to_thread(atomic_write, self.path, blob)

    async def _persist_put(self, kind: str, id: str, obj: dict) -> None:
        data = {k: dict(v) for k, v in self.data.items()}
        data[kind][id] = obj
        await self._save(data)

    async def _persist_delete(self, kind: str, id: str) -> None:
        data = {k: dict(v) for k, v in self.data.items()}
        data[kind].pop(id, None)
        await self._save(data)
