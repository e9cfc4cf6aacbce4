"""The embedded store: one JSON (or YAML) document on disk, written atomically and durably.

Document shape: ``{"models": {id: {...}}, "apikeys": {id: {...}}}``; a path ending in
``.yaml``/``.yml`` is read and written as YAML, anything else as JSON. A write goes to a temp
file in the same folder, is fsynced, renamed over the document (POSIX rename is atomic), and
the folder is fsynced, so a process killed at any moment (or a power cut) leaves either the
old or the new document, never a torn one. A document that cannot be read or parsed stops
the start with an error naming the file, and is never overwritten.

One process owns the file at a time: ``start`` takes an exclusive ``flock`` on ``PATH.lock``.
API keys that an older aisix stored in plaintext are hashed at ``start`` and the document is
written back at once (atomically, as above), before anything is served.
"""
from __future__ import annotations

import asyncio
import fcntl
import glob
import os
import tempfile
import time

import orjson
import yaml

from aisix.config.resources import SCHEMAS
from aisix.config.store.base import ConfigStore, StoreError, hash_plaintext_keys, log

#: leftover temp files (from a process killed mid-write) older than this are removed at start, s
_STALE_TMP_S = 60.0


def _is_yaml(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def _tmp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically (temp + fsync + rename + fsync dir)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=folder)
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


def encode_document(path: str, data: dict[str, dict[str, dict]]) -> bytes:
    """The document's bytes, in the format the path's extension names."""
    doc = {kind: data.get(kind, {}) for kind in SCHEMAS}
    if _is_yaml(path):
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def read_document(path: str) -> dict[str, dict[str, dict]]:
    """Read the document; a missing file is empty. Raises :class:`StoreError` naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {kind: {} for kind in SCHEMAS}
    except OSError as e:
        raise StoreError(f"{path}: cannot read the resources file: {e.strerror or e}") from e
    untouched = "fix or move it away; it is left untouched"
    try:
        if not raw.strip():
            doc = {}
        elif _is_yaml(path):
            doc = yaml.safe_load(raw)
        else:
            doc = orjson.loads(raw)
    except (orjson.JSONDecodeError, yaml.YAMLError) as e:
        fmt = "YAML" if _is_yaml(path) else "JSON"
        raise StoreError(f"{path}: corrupt resources file (not valid {fmt}: {e}); {untouched}") from e
    if doc is None:
        doc = {}
    sections = {k: {} if doc.get(k) is None else doc.get(k) for k in SCHEMAS} if isinstance(doc, dict) else None
    if sections is None or not all(isinstance(sec, dict) and all(isinstance(v, dict) for v in sec.values())
                                   for sec in sections.values()):
        raise StoreError(f"{path}: corrupt resources file (expected an object with `models` and "
                         f"`apikeys` objects of id -> object); {untouched}")
    return {kind: {str(rid): {**obj, "id": str(rid)} for rid, obj in sec.items()} for kind, sec in sections.items()}


def _remove_stale_temps(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    pattern = os.path.join(glob.escape(folder), glob.escape(_tmp_prefix(path)) + "*.tmp")
    now = time.time()
    for tmp in glob.glob(pattern):
        try:
            if now - os.stat(tmp).st_mtime > _STALE_TMP_S:
                os.unlink(tmp)
        except OSError:
            pass


class FileStore(ConfigStore):
    """Resources in one local document (``deployment.file.path``)."""

    def __init__(self, path: str, holder):
        super().__init__(holder)
        self.path = path
        self._lock_fd: int | None = None

    async def start(self) -> None:
        self._take_lock()
        self.data = read_document(self.path)
        _remove_stale_temps(self.path)
        if migrated := hash_plaintext_keys(self.data):
            await self._save(self.data)
            log.warning("%s: %d API keys were stored in plaintext; now stored as SHA-256 hashes",
                        self.path, len(migrated))
        self.publish()

    async def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _take_lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"{lock_path}: cannot open the lock file: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"{self.path}: in use by another aisix process (lock {lock_path} is held); "
                             "use another deployment.file.path, or etcd to share configuration") from e
        self._lock_fd = fd

    async def _save(self, data: dict) -> None:
        blob = encode_document(self.path, data)
        try:
            await asyncio.to_thread(atomic_write, self.path, blob)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot write the resources file: {e.strerror or e}") from e

    async def _persist_put(self, kind: str, id: str, obj: dict) -> None:
        data = {k: dict(v) for k, v in self.data.items()}
        data[kind][id] = obj
        await self._save(data)

    async def _persist_delete(self, kind: str, id: str) -> bool:
        if id not in self.data[kind]:
            return False
        data = {k: dict(v) for k, v in self.data.items()}
        data[kind].pop(id, None)
        await self._save(data)
        return True


class FileFollower(ConfigStore):
    """A read-only view of a document another process owns (the extra ``--workers`` of one
    gateway): loads it, then re-reads it when its size, mtime or inode changes (polled every
    ``poll`` s; an atomic rename always shows as a new inode). An unreadable or half-valid
    version is skipped and the last good one kept. Writes raise :class:`StoreError`."""

    def __init__(self, path: str, holder, poll: float = 0.25):
        super().__init__(holder)
        self.path = path
        self.poll = poll
        self._sig: tuple | None = None
        self._task: asyncio.Task | None = None

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _reload(self) -> None:
        self._sig = self._stat()
        self.data = read_document(self.path)
        hash_plaintext_keys(self.data)  # worker 0 writes them back; never serve a plaintext copy
        self.publish()

    async def start(self) -> None:
        self._reload()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="aisix-file-follower")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            if self._stat() != self._sig:
                try:
                    self._reload()
                except StoreError as e:
                    log.warning("keeping the last good configuration: %s", e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _persist_put(self, kind: str, id: str, obj: dict) -> None:
        raise StoreError(f"{self.path}: read-only in this worker; write through worker 0's Admin API")

    async def _persist_delete(self, kind: str, id: str) -> bool:
        raise StoreError(f"{self.path}: read-only in this worker; write through worker 0's Admin API")
