"""Client keys stored hashed, with a lifecycle, through the whole gateway: the Admin API writes a
key, the official ``openai`` client uses it, ``disabled``/``expires_at`` end it (401 in the OpenAI
envelope), rate-limit counts follow the key's id through an update, and the embedded default
migrates a plaintext store written by an older aisix on its first start.

The gateway runs in the test's process (``start_gateway`` + ``Server``, what ``serve`` runs) on a
file store and on a real etcd, with the ``mock`` provider as its upstream.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time

import aiohttp
import openai
import orjson
import pytest

from aisix.config.loader import Config
from aisix.config.resources import hash_key
from aisix.server.lifecycle import Server, start_gateway
from tests.support.services import HOST, free_port

ADMIN = "admin-key-for-key-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["file", "etcd"])
async def gateway(request, tmp_path):
    """A running gateway (file store or real etcd), telemetry off, a fast ``mock`` model."""
    etcd = request.getfixturevalue("etcd") if request.param == "etcd" else None
    doc = {"server": {"proxy": {"listen": f"{HOST}:{free_port()}"}, "admin": {"listen": f"{HOST}:{free_port()}"}},
           "deployment": {"admin": {"admin_key": [{"key": ADMIN}]},
                          "config_provider": request.param, "file": {"path": str(tmp_path / "resources.json")},
                          "etcd": {"host": [etcd.endpoint] if etcd else [], "timeout": 2}},
           "observability": {"enabled": False},
           "models": [{"name": "mock", "model": "mock/mock-1",
                       "provider_config": {"ttft_ms": 0, "tpot_ms": 0, "tokens": 3}}]}
    gw = await start_gateway(Config.model_validate(doc))
    server = Server(gw)
    await server.start()
    gw.admin_url = f"http://{doc['server']['admin']['listen']}/aisix/admin"
    gw.base_url = f"http://{doc['server']['proxy']['listen']}/v1"
    try:
        yield gw
    finally:
        await server.stop()


async def _admin(gw, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.request(method, gw.admin_url + path, json=body) as r:
            return r.status, await r.json()


async def _chat(gw, key: str):
    """One non-streamed chat with the official client: the completion, or the APIStatusError."""
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        try:
            return await client.chat.completions.with_raw_response.create(model="mock", messages=MSGS)
        except openai.APIStatusError as e:
            return e


def _rfc3339(seconds_from_now: float) -> str:
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds_from_now)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


async def test_disabled_and_expired_keys_get_401_in_the_openai_envelope(gateway):
    status, created = await _admin(gateway, "POST", "/apikeys", {"allowed_models": ["mock"]})
    assert status == 201
    secret, kid = created["key"], created["id"]
    assert (await _chat(gateway, secret)).status_code == 200

    async def refused(code: str) -> None:
        err = await _chat(gateway, secret)
        assert isinstance(err, openai.AuthenticationError), err
        assert err.status_code == 401 and err.code == code and err.type == "authentication_error", err.body
        assert secret not in err.message

    status, body = await _admin(gateway, "PUT", f"/apikeys/{kid}", {"allowed_models": ["mock"], "disabled": True})
    assert status == 200 and body["disabled"] is True and "key" not in body
    await refused("disabled_api_key")
    past = _rfc3339(-60)
    await _admin(gateway, "PUT", f"/apikeys/{kid}", {"allowed_models": ["mock"], "expires_at": past})
    await refused("expired_api_key")
    assert past in (await _chat(gateway, secret)).message  # says when
    await _admin(gateway, "PUT", f"/apikeys/{kid}", {"allowed_models": ["mock"], "expires_at": _rfc3339(3600)})
    assert (await _chat(gateway, secret)).status_code == 200
    # one that expires while the gateway runs: nothing needs to change in the store
    await _admin(gateway, "PUT", f"/apikeys/{kid}", {"allowed_models": ["mock"], "expires_at": _rfc3339(2)})
    assert (await _chat(gateway, secret)).status_code == 200
    deadline = time.monotonic() + 10  # no timing asserted: poll until it has passed
    while (r := await _chat(gateway, secret)).status_code == 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert r.code == "expired_api_key"
    err = await _chat(gateway, "sk-not-a-key")
    assert err.status_code == 401 and err.code == "invalid_api_key"


async def test_rate_limit_counts_follow_the_key_through_an_update(gateway):
    """rpm 5: three requests, then a replace (new limit, new allowed models, even a new secret):
    the counts go on from 3, so one request is left under the new rpm of 4."""
    status, created = await _admin(gateway, "POST", "/apikeys", {"allowed_models": ["mock"], "rate_limit": {"rpm": 5}})
    secret, kid = created["key"], created["id"]
    for left in ("4", "3", "2"):
        r = await _chat(gateway, secret)
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == left
    status, _ = await _admin(gateway, "POST", "/models", {"name": "other", "model": "mock/mock-2"})
    assert status == 201
    status, body = await _admin(gateway, "PUT", f"/apikeys/{kid}", {
        "key": "sk-rotated-secret-0001", "allowed_models": ["mock", "other"], "rate_limit": {"rpm": 4}})
    assert status == 200
    r = await _chat(gateway, "sk-rotated-secret-0001")
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "0"
    err = await _chat(gateway, "sk-rotated-secret-0001")
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and kid in err.message
    assert (await _chat(gateway, secret)).code == "invalid_api_key"  # the old secret is gone


async def test_the_store_never_holds_a_client_secret(gateway):
    secrets = [(await _admin(gateway, "POST", "/apikeys", {"allowed_models": ["mock"]}))[1]["key"] for _ in range(3)]
    await _admin(gateway, "POST", "/apikeys", {"key": "sk-chosen-by-the-operator", "allowed_models": []})
    secrets.append("sk-chosen-by-the-operator")
    store = gateway.store
    if hasattr(store, "path"):
        with open(store.path, "rb") as f:
            stored = f.read()
    else:
        stored = b"".join(kv.value for kv in await store._get_client().get_prefix(store._root))
    assert not any(s.encode() in stored for s in secrets)
    assert all(hash_key(s).encode() in stored for s in secrets)
    status, listed = await _admin(gateway, "GET", "/apikeys")
    assert not any(s in json.dumps(listed) for s in secrets)
    # at most 8 characters, at most a quarter of the key
    assert sorted(k["key_prefix"] for k in listed["list"]) == sorted(s[:min(8, len(s) // 4)] for s in secrets)


def test_embedded_default_migrates_an_old_plaintext_store_and_keeps_serving(tmp_path):
    """``serve`` with no config over a data dir an older aisix wrote: credentials.json plus a
    resources.json with client keys in plaintext. The first start hashes them in the file; every
    key (the embedded client key and an Admin-created one) still works, before and after a restart."""
    data = tmp_path / "data"
    data.mkdir()
    creds = {"admin_key": "admin-old-install-0001", "client_key": "sk-old-install-client-key-0001"}
    (data / "credentials.json").write_text(json.dumps(creds))
    (data / "credentials.json").chmod(0o600)
    old = {"models": {"m-id": {"name": "mock", "model": "mock/mock-1", "provider_config": {"tokens": 2, "ttft_ms": 0}}},
           "apikeys": {"k-embedded": {"key": creds["client_key"], "allowed_models": ["mock"]},
                       "k-admin": {"key": "sk-made-by-the-admin-api-0001", "allowed_models": ["mock"]}}}
    (data / "resources.json").write_bytes(orjson.dumps(old))
    for attempt in range(2):
        port = free_port()
        log = open(tmp_path / f"out{attempt}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "aisix", "serve", "--data-dir", str(data),
                                 "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{free_port()}"],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={"PATH": os.environ["PATH"], "OTEL_SDK_DISABLED": "true"})
        try:
            deadline = time.monotonic() + 20
            while "client key:" not in (tmp_path / f"out{attempt}.log").read_text():
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / f"out{attempt}.log").read_text()
                time.sleep(0.05)
            for secret in (creds["client_key"], "sk-made-by-the-admin-api-0001"):
                client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key=secret, max_retries=0)
                assert client.chat.completions.create(model="mock", messages=MSGS).choices[0].message.content
            stored = (data / "resources.json").read_text()
            assert creds["client_key"] not in stored and "sk-made-by-the-admin-api" not in stored
            assert set(json.loads(stored)["apikeys"]) == {"k-embedded", "k-admin"}
        finally:
            proc.terminate()
            assert proc.wait(15) == 0
            log.close()
    assert "stored in plaintext" in (tmp_path / "out0.log").read_text()
    assert "stored in plaintext" not in (tmp_path / "out1.log").read_text()
