"""The etcd store against a real etcd: load, watch, local writes, two writers, outages, compaction."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time

import aetcd
import orjson
import pytest

from aisix.config.loader import EtcdConfig
from aisix.config.resources import hash_key
from aisix.config.snapshot import SnapshotHolder
from aisix.config.store import ConflictError, StoreError, StoreUnavailable
from aisix.config.store.etcd import EtcdStore
from tests.support.services import free_port
from tests.support.tcp_cut import TcpCut

M = {"name": "m", "model": "mock/m1", "provider_config": {"tokens": 3}}


def _model(name: str, **extra) -> bytes:
    return orjson.dumps({**M, "name": name, **extra})


@contextlib.asynccontextmanager
async def _store(*endpoints: str, prefix: str = "/aisix", timeout: float = 2.0):
    store = EtcdStore(EtcdConfig(host=list(endpoints), prefix=prefix, timeout=timeout), SnapshotHolder())
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _raw(etcd):
    client = aetcd.Client(host=etcd.host, port=etcd.port, timeout=5)
    try:
        yield client
    finally:
        await client.close()


async def _until(predicate, timeout: float = 5.0, what: str = "condition") -> float:
    """Poll ``predicate`` every ms; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.001)
    return time.monotonic() - start


async def test_loads_everything_under_the_prefix_and_skips_the_rest(etcd, caplog):
    async with _raw(etcd) as raw:
        await raw.put(b"/aisix/models/a", _model("alpha"))
        await raw.put(b"/aisix/apikeys/k", orjson.dumps({"key": "sk-1", "allowed_models": ["alpha"]}))
        await raw.put(b"/aisix/models/bad-json", b"{not json")
        await raw.put(b"/aisix/models/bad-schema", _model("x", model="nope/x"))
        await raw.put(b"/aisix/models/list", b"[1]")
        await raw.put(b"/aisix/routes/r", _model("route"))         # another kind: ignored
        await raw.put(b"/aisix/models/a/b", _model("nested"))      # not {kind}/{id}: ignored
        await raw.put(b"/aisix2/models/z", _model("neighbour"))    # another prefix: ignored
        async with _store(etcd.endpoint) as store:
            assert set(store.holder.current.models) == {"alpha"}
            assert store.holder.current.key_for("sk-1").id == "k"
            assert store.holder.current.models["alpha"].id == "a"
            assert store.connected or await _until(lambda: store.connected) is not None
    for word in ("bad-json", "bad-schema", "unknown provider", "list"):
        assert word in caplog.text


async def test_changes_made_straight_in_etcd_serve_within_a_second(etcd):
    async with _store(etcd.endpoint) as store, _raw(etcd) as raw:
        await _until(lambda: store.connected, what="the watch")
        await raw.put(b"/aisix/models/a", _model("alpha"))
        assert await _until(lambda: "alpha" in store.holder.current.models) < 1
        await raw.put(b"/aisix/models/a", _model("alpha", rate_limit={"rpm": 7}))
        await _until(lambda: (m := store.holder.current.models.get("alpha")) and m.rate_limit and m.rate_limit.rpm == 7)
        await raw.put(b"/aisix/apikeys/k", orjson.dumps({"key": "sk-1", "allowed_models": []}))
        # a key in plaintext (as an older aisix writes it during a rolling upgrade) serves, hashed
        await _until(lambda: store.holder.current.key_for("sk-1") is not None)
        assert "key" not in store.get("apikeys", "k")
        await raw.delete(b"/aisix/models/a")
        assert await _until(lambda: "alpha" not in store.holder.current.models) < 1
        await raw.put(b"/aisix/models/b", b"garbage")  # a bad write changes nothing else
        await raw.put(b"/aisix/models/c", _model("gamma"))
        await _until(lambda: "gamma" in store.holder.current.models)
        assert set(store.holder.current.models) == {"gamma"}


async def test_local_writes_serve_at_once_and_land_in_etcd_as_json(etcd):
    async with _store(etcd.endpoint) as store, _raw(etcd) as raw:
        assert await store.put("models", "a", M) is True
        assert "m" in store.holder.current.models  # no waiting for the watch
        stored = orjson.loads((await raw.get(b"/aisix/models/a")).value)
        assert stored == {**M, "id": "a"}
        assert await store.put("models", "a", {**M, "rate_limit": {"tpm": 5}}) is False
        assert store.holder.current.models["m"].rate_limit.tpm == 5
        revision = store.holder.current.revision
        await asyncio.sleep(0.3)  # the watch echoes our own writes: no further swap
        assert store.holder.current.revision == revision
        assert await store.delete("models", "a") is True
        assert "m" not in store.holder.current.models and await raw.get(b"/aisix/models/a") is None
        assert await store.delete("models", "a") is False


async def test_plaintext_keys_are_stored_hashed_on_first_start_without_losing_one(etcd):
    """Keys an older aisix wrote in plaintext: two nodes starting at once both serve every key,
    etcd ends up holding only hashes (each key rewritten once, never clobbered), and a key edited
    in etcd between the list and the rewrite keeps the edit."""
    secrets = {f"k{i}": f"sk-legacy-{i:02d}-abcdefgh" for i in range(12)}
    async with _raw(etcd) as raw:
        for rid, secret in secrets.items():
            await raw.put(f"/aisix/apikeys/{rid}".encode(),
                          orjson.dumps({"key": secret, "allowed_models": ["m"], "rate_limit": {"rpm": 5}}))
        before = (await raw.get(b"/aisix/apikeys/k0")).mod_revision
        a, b = (EtcdStore(EtcdConfig(host=[etcd.endpoint], timeout=2.0), SnapshotHolder()) for _ in range(2))
        try:
            await asyncio.gather(a.start(), b.start())  # both list the plaintext keys, both try to rewrite them
            for store in (a, b):
                for rid, secret in secrets.items():
                    key = store.holder.current.key_for(secret)
                    assert key is not None and key.id == rid and key.rate_limit.rpm == 5
                assert all("key" not in obj for obj in store.list("apikeys"))
            values = {kv.key.decode().rsplit("/", 1)[1]: kv for kv in await raw.get_prefix(b"/aisix/apikeys/")}
            assert set(values) == set(secrets)
            for rid, kv in values.items():
                stored = orjson.loads(kv.value)
                assert "key" not in stored and stored["key_hash"] == hash_key(secrets[rid])
                assert secrets[rid].encode() not in kv.value
                assert kv.version == 2  # written once, then hashed once (by one of the two nodes)
        finally:
            await asyncio.gather(a.close(), b.close())
        assert (await raw.get(b"/aisix/apikeys/k0")).mod_revision > before

        # an edit that lands between a node's list and its rewrite wins
        await raw.put(b"/aisix/apikeys/late", orjson.dumps({"key": "sk-late-key-1234", "allowed_models": []}))
        store = EtcdStore(EtcdConfig(host=[etcd.endpoint], timeout=2.0), SnapshotHolder())
        try:
            await store._relist()
            await raw.put(b"/aisix/apikeys/late", orjson.dumps({"key": "sk-late-key-1234", "allowed_models": ["m"]}))
            await store._hash_plaintext_keys()
        finally:
            await store.close()
        assert orjson.loads((await raw.get(b"/aisix/apikeys/late")).value)["allowed_models"] == ["m"]


async def test_two_nodes_never_create_the_same_name(etcd):
    async with _store(etcd.endpoint) as a, _store(etcd.endpoint) as b:
        for round_ in range(10):
            name = f"race-{round_}"
            results = await asyncio.gather(a.put("models", f"a{round_}", {**M, "name": name}),
                                           b.put("models", f"b{round_}", {**M, "name": name}),
                                           return_exceptions=True)
            assert sorted(type(r).__name__ for r in results) == ["ConflictError", "bool"], results
        ids = await asyncio.gather(a.upsert_by_unique("models", {**M, "name": "seeded"}),
                                   b.upsert_by_unique("models", {**M, "name": "seeded"}))
        assert ids[0] == ids[1]
        async with _raw(etcd) as raw:
            names = [orjson.loads(kv.value)["name"] for kv in await raw.get_prefix(b"/aisix/models/")]
        assert sorted(names) == sorted({*names}) and len(names) == 11
        await _until(lambda: len(a.holder.current.models) == len(b.holder.current.models) == 11)
        with pytest.raises(ConflictError):
            await a.put("models", "x", {**M, "name": "seeded"})


async def test_a_write_on_one_node_serves_on_the_other_within_a_second(etcd):
    async with _store(etcd.endpoint) as a, _store(etcd.endpoint) as b:
        await _until(lambda: b.connected, what="the watch")
        delays = []
        for i in range(20):
            await a.put("models", f"id{i}", {**M, "name": f"n{i}"})
            delays.append(await _until(lambda: f"n{i}" in b.holder.current.models))
        await a.delete("models", "id0")
        delays.append(await _until(lambda: "n0" not in b.holder.current.models))
        assert max(delays) < 1, delays


async def test_etcd_down_keeps_the_last_good_config_then_resumes(etcd, caplog):
    async with _store(etcd.endpoint) as store:
        await store.put("models", "a", M)
        await _until(lambda: store.connected, what="the watch")
        etcd.stop()
        await _until(lambda: not store.connected, what="the store to notice")
        for _ in range(10):  # it keeps serving what it had
            assert set(store.holder.current.models) == {"m"}
            await asyncio.sleep(0.1)
        with pytest.raises(StoreUnavailable) as e:
            await store.put("models", "b", {**M, "name": "n"})
        assert etcd.endpoint in str(e.value)
        assert "serving the last good configuration" in caplog.text
        etcd.start()
        await _until(lambda: store.connected, timeout=15, what="the watch to resume")
        async with _raw(etcd) as raw:
            await raw.put(b"/aisix/models/c", _model("after"))
        assert await _until(lambda: "after" in store.holder.current.models) < 1
        assert await store.put("models", "b", {**M, "name": "n"}) is True
        assert set(store.holder.current.models) == {"m", "after", "n"}
    assert "watch resumed" in caplog.text


async def test_a_cut_client_resumes_from_its_revision_and_misses_nothing(etcd, caplog):
    cut = await TcpCut(etcd.host, etcd.port).start()
    try:
        async with _raw(etcd) as raw:
            await raw.put(b"/aisix/models/keep", _model("keep"))
            await raw.put(b"/aisix/models/gone", _model("gone"))
            async with _store(cut.endpoint) as store:
                await _until(lambda: store.connected, what="the watch")
                await cut.cut()
                await _until(lambda: not store.connected, what="the store to notice")
                await raw.delete(b"/aisix/models/gone")
                for i in range(5):
                    await raw.put(f"/aisix/models/new{i}".encode(), _model(f"new{i}"))
                await raw.put(b"/aisix/models/keep", _model("keep", rate_limit={"rpm": 1}))
                assert set(store.holder.current.models) == {"keep", "gone"}
                await cut.restore()
                await _until(lambda: len(store.holder.current.models) == 6, timeout=15, what="catching up")
                assert set(store.holder.current.models) == {"keep", *(f"new{i}" for i in range(5))}
                assert store.holder.current.models["keep"].rate_limit.rpm == 1
        assert "re-listed" not in caplog.text and "watch resumed" in caplog.text
    finally:
        await cut.close()


async def test_compaction_while_cut_off_triggers_a_relist(etcd, caplog):
    cut = await TcpCut(etcd.host, etcd.port).start()
    try:
        async with _raw(etcd) as raw:
            await raw.put(b"/aisix/models/keep", _model("keep"))
            await raw.put(b"/aisix/models/gone", _model("gone"))
            async with _store(cut.endpoint) as store:
                await _until(lambda: store.connected, what="the watch")
                await cut.cut()
                await _until(lambda: not store.connected, what="the store to notice")
                await raw.delete(b"/aisix/models/gone")
                await raw.put(b"/aisix/models/new", _model("new"))
                await raw.put(b"/aisix/other", b"x")  # move the revision on
                head = (await raw.put(b"/aisix/other", b"y")).header.revision
                await raw.compact(head, physical=True)
                await cut.restore()
                await _until(lambda: set(store.holder.current.models) == {"keep", "new"}, timeout=15,
                             what="the re-list")
                await raw.put(b"/aisix/models/later", _model("later"))  # and the watch goes on after it
                await _until(lambda: "later" in store.holder.current.models)
        assert "compacted" in caplog.text and "re-listed" in caplog.text
    finally:
        await cut.close()


async def test_start_with_etcd_down_fails_fast_naming_the_endpoint():
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StoreError) as e:
        async with _store(dead, timeout=1):
            pass
    assert time.monotonic() - started < 5
    assert dead in str(e.value) and "deployment.etcd.host" in str(e.value)


async def test_a_dead_first_endpoint_is_skipped(etcd):
    dead = f"127.0.0.1:{free_port()}"
    async with _store(dead, etcd.endpoint) as store:
        await store.put("models", "a", M)
        assert store.endpoint == etcd.endpoint
        await _until(lambda: store.connected, what="the watch")


async def test_prefixes_keep_deployments_apart(etcd):
    async with _store(etcd.endpoint, prefix="/one") as one, _store(etcd.endpoint, prefix="two/") as two:
        await one.put("models", "a", M)
        await two.put("models", "a", {**M, "name": "other"})
        await asyncio.sleep(0.2)
        assert set(one.holder.current.models) == {"m"} and set(two.holder.current.models) == {"other"}
        async with _raw(etcd) as raw:
            assert await raw.get(b"/two/models/a") is not None


async def test_secrets_are_not_logged(etcd, caplog):
    caplog.set_level(logging.DEBUG)
    async with _store(etcd.endpoint) as store, _raw(etcd) as raw:
        await store.put("models", "a", {**M, "provider_config": {"api_key": "sk-very-secret-1"}})
        await raw.put(b"/aisix/models/b", orjson.dumps({"name": "b", "model": "nope/x",
                                                        "provider_config": {"api_key": "sk-very-secret-2"}}))
        await raw.put(b"/aisix/models/c", b'{"api_key": "sk-very-secret-3", ')
        await asyncio.sleep(0.3)
    assert "sk-very-secret" not in caplog.text and "skipping" in caplog.text


async def _rebuild(etcd) -> None:
    """Stop etcd, wipe its data dir, start a fresh one (revision 1) on the same port."""
    etcd.stop()
    shutil.rmtree(etcd.data_dir)
    etcd.start()


async def test_an_etcd_rebuilt_with_a_lower_revision_is_re_listed(etcd, caplog):
    """etcd rebuilt (or restored from a backup) with a lower revision: the watch resumed at the
    old revision + 1, so the new etcd's writes were ignored until its revision passed the old one,
    and keys it does not have were still served. The store now notices and re-lists."""
    async with _raw(etcd) as raw:
        for name in ("alpha", "beta", "gamma"):
            await raw.put(f"/aisix/models/{name}".encode(), _model(name))
        for i in range(20):
            await raw.put(b"/aisix/other", b"%d" % i)  # the old revision: ~24
    async with _store(etcd.endpoint) as store:
        await _until(lambda: store.connected, what="the watch")
        await _rebuild(etcd)
        async with _raw(etcd) as raw:
            await raw.put(b"/aisix/models/alpha", _model("alpha", rate_limit={"rpm": 3}))
            await raw.put(b"/aisix/models/fresh", _model("fresh"))
            await _until(lambda: set(store.holder.current.models) == {"alpha", "fresh"}, timeout=15,
                         what="the rebuilt etcd's keys (beta and gamma forgotten)")
            assert store.holder.current.models["alpha"].rate_limit.rpm == 3
            await raw.put(b"/aisix/models/later", _model("later"))  # and the watch goes on after it
            await _until(lambda: "later" in store.holder.current.models)
    assert "re-listed" in caplog.text


async def test_an_etcd_rebuilt_past_the_old_revision_while_away_is_re_listed(etcd, caplog):
    """The rebuilt etcd already passed the old revision when the store reaches it again: a watch
    from the old revision + 1 would miss everything before it. The keys held at that revision
    differ from the store's copy, so it re-lists."""
    caplog.set_level(logging.WARNING, logger="aisix.store.etcd")
    cut = await TcpCut(etcd.host, etcd.port).start()
    try:
        async with _raw(etcd) as raw:
            await raw.put(b"/aisix/models/alpha", _model("alpha"))
            await raw.put(b"/aisix/models/beta", _model("beta"))
        async with _store(cut.endpoint) as store:
            await _until(lambda: store.connected, what="the watch")
            old = store.revision
            await cut.cut()
            await _until(lambda: not store.connected, what="the store to notice")
            await _rebuild(etcd)
            async with _raw(etcd) as raw:
                await raw.put(b"/aisix/models/fresh", _model("fresh"))
                for i in range(old + 5):
                    await raw.put(b"/aisix/other", b"%d" % i)  # past the old revision
            await cut.restore()
            await _until(lambda: set(store.holder.current.models) == {"fresh"}, timeout=15,
                         what="the rebuilt etcd's keys")
        assert "re-listed" in caplog.text
    finally:
        await cut.close()
