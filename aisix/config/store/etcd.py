"""The shared store: resources in etcd v3, one JSON value per key, watched live.

Keys: ``{prefix}/models/{id}`` and ``{prefix}/apikeys/{id}``; other keys under the prefix
are ignored. ``start`` lists everything under ``{prefix}/`` (failing fast, naming the
endpoints, when etcd cannot be reached), publishes, then a background task watches the
prefix from the listed revision + 1. When etcd goes away the last good snapshot keeps
serving; the task retries with capped, jittered backoff, rotating through
``deployment.etcd.host``, and resumes the watch from the last revision seen + 1 when the etcd
it reaches still holds the history this copy came from; otherwise it re-lists. Before resuming
it reads the keys (keys only) at that revision: an etcd rebuilt or restored with a lower
revision answers "future revision", a compacted one "compacted", another cluster another
cluster id, and a rebuilt one that already passed the revision other keys or mod revisions. Writes (the Admin API) go to etcd and are applied locally
at once; their own watch events are then recognised and skipped.

Uniqueness across nodes: a write reads the kind's keys, checks the name/key, and commits in
a transaction guarded by "no key of this kind changed since that read" (a range compare on
``mod_revision``), retrying on a clash, so two nodes can never create the same name.

API keys an older aisix stored in plaintext are hashed as they are read; ``start`` writes the
ones it listed back hashed, each in a transaction guarded by its listed ``mod_revision`` (a
concurrent edit, or another node migrating the same key, wins; its value comes by the watch).

Client: ``aetcd`` (asyncio, pure Python, maintained): it exposes revisions, watch with
``start_revision`` and compaction errors, which a resumable watch needs.
"""
from __future__ import annotations

import asyncio
import logging
import random

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import orjson

from aisix.config.loader import EtcdConfig
from aisix.config.resources import SCHEMAS, stored_api_key
from aisix.config.store.base import ChooseId, ConfigStore, StoreError, StoreUnavailable, check_unique

log = logging.getLogger("aisix.store.etcd")

_GRPC_OPTIONS = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    # notice a silently dead connection (no RST) within ~15 s; etcd allows pings every 5 s
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,  # the watch stream is always a call
    "grpc.http2.max_pings_without_data": 0,
    # reconnect promptly when etcd returns (gRPC's default backoff grows to 120 s)
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}
_WRITE_ATTEMPTS = 8
_ETCD_ERRORS = (aetcd.exceptions.ClientError, aetcd.rpc.AioRpcError, asyncio.TimeoutError, OSError)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.1, 2.0


def parse_endpoint(host: str) -> tuple[str, int]:
    """``127.0.0.1:2379`` or ``http://127.0.0.1:2379`` → ``("127.0.0.1", 2379)``."""
    if host.startswith("https://"):
        raise StoreError(f"etcd endpoint {host}: TLS is not supported; use http:// on a trusted network")
    rest = host.removeprefix("http://").rstrip("/")
    name, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        name, port = rest, "2379"
    return name.strip("[]"), int(port)


class _Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self):
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        cap = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** self.attempt)
        self.attempt += 1
        return random.uniform(cap / 2, cap)


class EtcdStore(ConfigStore):
    """Resources in etcd (``deployment.etcd``)."""

    def __init__(self, config: EtcdConfig, holder):
        super().__init__(holder)
        self.endpoints = [parse_endpoint(h) for h in config.host] or [("127.0.0.1", 2379)]
        self.prefix = "/" + config.prefix.strip("/") if config.prefix.strip("/") else ""
        self.timeout = config.timeout
        self.revision = 0          # the etcd revision the local copy reflects (list or watch)
        self.cluster_id = 0        # the etcd cluster the local copy came from
        self.connected = False     # is the watch up?
        self._mods: dict[bytes, int] = {}  # each resource key etcd held at `revision`: its mod_revision
        self._listed = False       # the copy was just listed: the next watch needs no history check
        self._root = (self.prefix + "/").encode()
        self._client: aetcd.Client | None = None
        self._endpoint_index = 0
        self._local: dict[tuple[str, str], int] = {}  # our writes the watch has not delivered yet: rev
        self._task: asyncio.Task | None = None
        self._publish_handle: asyncio.Handle | None = None
        self._need_relist = False
        self._plaintext: dict[str, int] = {}  # API keys listed in plaintext: id -> mod_revision

    # -- life cycle -----------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._endpoint_index]
        return f"http://{host}:{port}"

    def _all_endpoints(self) -> str:
        return ", ".join(f"http://{h}:{p}" for h, p in self.endpoints)

    async def start(self) -> None:
        """List all, publish, start watching. Raises :class:`StoreError` if no endpoint answers."""
        errors = []
        for _ in self.endpoints:
            try:
                await self._relist()
                break
            except Exception as e:  # noqa: BLE001 - any failure to reach this endpoint
                errors.append(f"{self.endpoint}: {_describe(e)}")
                await self._drop_client()
        else:
            raise StoreError(f"etcd unreachable at {self._all_endpoints()} ({'; '.join(errors)}); "
                             "start etcd or fix deployment.etcd.host")
        await self._hash_plaintext_keys()
        self.publish()
        log.info("etcd store: %d models, %d API keys at revision %d from %s (prefix %s/)",
                 len(self.data["models"]), len(self.data["apikeys"]), self.revision, self.endpoint, self.prefix)
        self._task = asyncio.create_task(self._watch_loop(), name="aisix-etcd-watch")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # aetcd's watch iterator can swallow one cancellation while it waits on its gRPC stream;
            # closing the channel below ends that stream, so the wait is bounded, never a hang
            await asyncio.wait({task}, timeout=1.0)
        if self._publish_handle is not None:
            self._publish_handle.cancel()
        await self._drop_client(rotate=False)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    # -- etcd client ----------------------------------------------------------
    def _get_client(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._endpoint_index]
            self._client = aetcd.Client(host=host, port=port, timeout=self.timeout, options=_GRPC_OPTIONS)
        return self._client

    async def _drop_client(self, rotate: bool = True) -> None:
        client, self._client = self._client, None
        if rotate:
            self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), self.timeout)
            except Exception:  # noqa: BLE001 - a dead channel may fail to close cleanly
                pass

    def _key(self, kind: str, rid: str) -> bytes:
        return self._root + f"{kind}/{rid}".encode()

    def _parse_key(self, key: bytes) -> tuple[str, str] | None:
        if not key.startswith(self._root):
            return None
        kind, sep, rid = key[len(self._root):].decode(errors="replace").partition("/")
        if not sep or kind not in SCHEMAS or not rid or "/" in rid:
            return None
        return kind, rid

    @staticmethod
    def _parse_value(kind: str, rid: str, value: bytes, plaintext: list | None = None) -> dict | None:
        """The stored dict with its ``id``, or None (logged) if it is not a JSON object. An API key
        in plaintext comes back hashed, its id appended to ``plaintext``."""
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("skipping %s %s: its etcd value is not JSON", kind, rid)
            return None
        if not isinstance(obj, dict):
            log.warning("skipping %s %s: its etcd value is not a JSON object", kind, rid)
            return None
        if kind == "apikeys" and (hashed := stored_api_key(obj)) is not obj:
            obj = hashed
            if plaintext is not None:
                plaintext.append(rid)
        return {**obj, "id": rid}

    async def _hash_plaintext_keys(self) -> None:
        """Write back hashed the API keys the last list found in plaintext (each guarded by its
        listed mod_revision). A failure is logged; the next start tries again."""
        todo, self._plaintext = self._plaintext, {}
        client, done = self._get_client(), 0
        for rid, mod in todo.items():
            key, obj = self._key("apikeys", rid), self.data["apikeys"].get(rid)
            if obj is None:
                continue
            try:
                ok, _ = await self._call(client.transaction(
                    compare=[client.transactions.mod(key) == mod],
                    success=[client.transactions.put(key, orjson.dumps(obj))], failure=[]))
            except StoreUnavailable as e:
                log.error("etcd: could not store API key %s hashed (it stays in plaintext until the next "
                          "start): %s", rid, e)
                continue
            done += ok
        if done:
            log.warning("etcd: %d API keys were stored in plaintext; now stored as SHA-256 hashes", done)

    # -- list and watch --------------------------------------------------------
    async def _relist(self) -> None:
        """Replace the local copy with everything under the prefix; keep our newer writes."""
        rng = await self._get_client().get_prefix(self._root)
        rev = rng.header.revision
        data: dict[str, dict[str, dict]] = {kind: {} for kind in SCHEMAS}
        mods = {}
        for kv in rng:
            where = self._parse_key(kv.key)
            plaintext: list[str] = []
            if where is not None:
                mods[kv.key] = kv.mod_revision
                if (obj := self._parse_value(*where, kv.value, plaintext)) is not None:
                    data[where[0]][where[1]] = obj
                    if plaintext:
                        self._plaintext[where[1]] = kv.mod_revision
        for (kind, rid), local_rev in self._local.items():
            if local_rev > rev:  # written here after the range was served
                if rid in self.data[kind]:
                    data[kind][rid] = self.data[kind][rid]
                else:
                    data[kind].pop(rid, None)
        # keep the dict objects that did not change, so publish re-validates only what did
        for kind in SCHEMAS:
            old = self.data[kind]
            data[kind] = {rid: old[rid] if old.get(rid) == obj else obj for rid, obj in data[kind].items()}
        self.data = data
        self.revision = rev
        self.cluster_id = rng.header.cluster_id
        self._mods = mods
        self._listed = True
        self._local = {k: r for k, r in self._local.items() if r > rev}

    async def _history_changed(self) -> str | None:
        """Why the etcd now reached no longer holds the history of this copy, or None if it does:
        the keys under the prefix at :attr:`revision` (keys only) must be the ones we hold, with
        the same mod revisions, in the same cluster. Raises what an etcd call raises."""
        client = self._get_client()
        await client.connect()
        req = aetcd.rpc.RangeRequest(key=self._root, range_end=aetcd.utils.prefix_range_end(self._root),
                                     revision=self.revision, keys_only=True)
        try:
            rng = await client.kvstub.Range(req, timeout=self.timeout, metadata=client.metadata)
        except aetcd.rpc.AioRpcError as e:
            if e.code() != aetcd.rpc.StatusCode.OUT_OF_RANGE:
                raise
            if "compacted" in (e.details() or ""):
                return f"revision {self.revision} was compacted"
            return f"its revision is behind {self.revision} (rebuilt or restored from a backup?)"
        if rng.header.cluster_id != self.cluster_id:
            return f"it is another cluster (id {rng.header.cluster_id:x}, was {self.cluster_id:x})"
        held = {kv.key: kv.mod_revision for kv in rng.kvs if self._parse_key(kv.key) is not None}
        if held != self._mods:
            return f"its keys at revision {self.revision} are not the ones listed (rebuilt?)"
        return None

    async def _watch_loop(self) -> None:
        backoff = _Backoff()
        down_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._need_relist and not self._listed:
                    why = await self._history_changed()
                    if why is not None:
                        log.warning("etcd %s: %s; re-listing", self.endpoint, why)
                        self._need_relist = True
                if self._need_relist:
                    await self._relist()
                    self._need_relist = False
                    self.publish()
                    log.warning("etcd: re-listed at revision %d", self.revision)
                watch = await self._get_client().watch_prefix(self._root, start_revision=self.revision + 1)
                self._listed = False
                self.connected = True
                if down_since is not None:
                    log.warning("etcd %s: watch resumed from revision %d after %.1fs",
                                self.endpoint, self.revision + 1, loop.time() - down_since)
                    down_since = None
                backoff.reset()
                async for event in watch:
                    self._on_event(event)
                raise aetcd.exceptions.ConnectionFailedError("watch ended")
            except asyncio.CancelledError:
                self.connected = False
                raise
            except aetcd.exceptions.RevisionCompactedError as e:
                self.connected = False
                log.warning("etcd: revision %d was compacted (%s); re-listing", self.revision + 1, e)
                self._need_relist = True
                continue
            except Exception as e:  # noqa: BLE001 - etcd down, timeouts, a broken stream
                self.connected = False
                self._listed = False  # by the next try etcd may be another one
                delay = backoff.next()
                if down_since is None:
                    down_since = loop.time()
                    log.warning("etcd %s unreachable (%s); serving the last good configuration "
                                "(revision %d); retrying with backoff", self.endpoint, _describe(e), self.revision)
                else:
                    log.debug("etcd %s still unreachable (%s); next try in %.2fs", self.endpoint, _describe(e), delay)
                await self._drop_client()
                await asyncio.sleep(delay)

    def _on_event(self, event) -> None:
        rev = event.kv.mod_revision
        self.revision = max(self.revision, rev)
        where = self._parse_key(event.kv.key)
        if where is not None:
            if event.kind == "PUT":
                self._mods[event.kv.key] = rev
            else:
                self._mods.pop(event.kv.key, None)
            local = self._local.get(where)
            if local is None or rev > local:  # else: our own write, already applied
                kind, rid = where
                obj = self._parse_value(kind, rid, event.kv.value) if event.kind == "PUT" else None
                if obj is None:
                    changed = self.data[kind].pop(rid, None) is not None
                else:
                    changed = self.data[kind].get(rid) != obj
                    if changed:
                        self.data[kind][rid] = obj
                if changed:
                    self._schedule_publish()
        if self._local:
            self._local = {k: r for k, r in self._local.items() if r > self.revision}

    def _schedule_publish(self) -> None:
        """Publish once after the events already queued (one watch response) are applied."""
        if self._publish_handle is None:
            self._publish_handle = asyncio.get_running_loop().call_soon(self._deferred_publish)

    def _apply(self, kind: str, rid: str, obj: dict) -> None:
        if self._publish_handle is not None:  # the watch applied this write first: publish now, not later
            self._publish_handle.cancel()
            self._publish_handle = None
            self.data[kind][rid] = obj
            self.publish()
        else:
            super()._apply(kind, rid, obj)

    def _deferred_publish(self) -> None:
        self._publish_handle = None
        self.publish()

    # -- writes ------------------------------------------------------------------
    async def _write(self, kind: str, choose: ChooseId, obj: dict) -> tuple[str, dict, bool]:
        """Read the kind fresh, check uniqueness, commit if no key of the kind changed meanwhile."""
        client = self._get_client()
        kind_prefix = self._key(kind, "")
        for _ in range(_WRITE_ATTEMPTS):
            rng = await self._call(client.get_prefix(kind_prefix))
            existing = {}
            for kv in rng:
                where = self._parse_key(kv.key)
                if where is not None and (other := self._parse_value(kind, where[1], kv.value)) is not None:
                    existing[where[1]] = other
            rid = choose(existing)
            stored = {**obj, "id": rid}
            check_unique(kind, existing, rid, stored)
            if existing.get(rid) == stored:
                return rid, stored, False
            unchanged = client.transactions.mod(kind_prefix, aetcd.utils.prefix_range_end(kind_prefix))
            ok, responses = await self._call(client.transaction(
                compare=[unchanged < rng.header.revision + 1],
                success=[client.transactions.put(self._key(kind, rid), orjson.dumps(stored))], failure=[]))
            if ok:
                self._local[(kind, rid)] = responses[0].response_put.header.revision
                return rid, stored, rid not in existing
            await asyncio.sleep(random.uniform(0, 0.02))  # another writer got in between: read again
        raise StoreUnavailable(f"etcd {self.endpoint}: too many concurrent writes to {kind}; try again")

    async def _call(self, awaitable, may_be_none: bool = False):
        """Await one etcd call; any failure becomes :class:`StoreUnavailable` naming the endpoint.
        (aetcd returns None from a call that failed with an unmapped gRPC status.)"""
        try:
            result = await awaitable
        except _ETCD_ERRORS as e:
            raise StoreUnavailable(f"etcd {self.endpoint} unreachable: {_describe(e)}") from e
        if result is None and not may_be_none:
            raise StoreUnavailable(f"etcd {self.endpoint}: the call failed")
        return result

    async def _persist_put(self, kind: str, id: str, obj: dict) -> None:  # pragma: no cover - _write covers it
        raise NotImplementedError

    async def _persist_delete(self, kind: str, id: str) -> bool:
        result = await self._call(self._get_client().delete(self._key(kind, id)), may_be_none=True)
        if result is None:
            return False
        self._local[(kind, id)] = result.header.revision
        return True


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
