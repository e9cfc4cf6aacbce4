"""The official ``openai`` client, sync and async, streaming and not, through the gateway;
chunk timing preserved; and the embedded default (``make serve``) serving the mock model."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import openai
import pytest

from tests.support import services
from tests.support.harness import ROLE, STOP, TXT, USAGE, GatewayProcess, ScriptedUpstream, ev, gateway_config

WHOLE = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up-1",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                      "logprobs": None, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


@pytest.fixture(scope="module")
def upstream():
    up = ScriptedUpstream().start()
    up.script("whole", headers={"Content-Type": "application/json"}, body=json.dumps(WHOLE).encode())
    up.script("stream", writes=[(0, ev(ROLE)), (0.01, ev(TXT("Hel"))), (0.01, ev(TXT("lo"))), (0.01, ev(STOP)),
                                (0, ev(USAGE(9, 2))), (0, b"data: [DONE]\n\n")])
    up.script("paced", writes=[(0, ev(ROLE))] + [(0.05, ev(TXT(f"t{i} "))) for i in range(20)] + [
        (0.05, ev(STOP)), (0, ev(USAGE(5, 20))), (0, b"data: [DONE]\n\n")])
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    with GatewayProcess(tmp_path_factory.mktemp("gw-openai"), gateway_config(upstream.base_url)) as g:
        yield g


def msgs(key):
    return [{"role": "user", "content": key}]


def test_sync_non_streaming(gw):
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
    r = client.chat.completions.create(model="m1", messages=msgs("whole"))
    assert r.choices[0].message.content == "Hello there"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 2, 11)


def test_sync_streaming_with_usage(gw):
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
    chunks = list(client.chat.completions.create(model="m1", messages=msgs("stream"), stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    assert chunks[-1].usage.total_tokens == 11 and chunks[-1].choices == []


async def test_async_non_streaming_and_streaming(gw):
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
    r = await client.chat.completions.create(model="m1", messages=msgs("whole"))
    assert r.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(model="m1", messages=msgs("stream"), stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    assert all(c.usage is None for c in chunks)  # not asked for: the usage chunk is not passed on
    await client.close()


def test_errors_reach_the_client_as_openai_errors(gw):
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="m1", messages=msgs("whole"))
    assert e.value.status_code == 401 and e.value.body["message"] == "Invalid API key"
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nope", messages=msgs("whole"))
    assert e.value.code == "model_not_found"
    models = client.models.list()
    assert [m.id for m in models.data] == ["m1"]


def test_chunk_gaps_preserved(gw):
    """50 ms between upstream chunks → ~50 ms between chunks at the client, not a burst."""
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
    times = []
    for c in client.chat.completions.create(model="m1", messages=msgs("paced"), stream=True):
        if c.choices and c.choices[0].delta.content:
            times.append(time.monotonic())
    assert len(times) == 20
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    assert 40 <= statistics.median(gaps) <= 60, gaps
    assert min(gaps) > 25, gaps  # no two chunks delivered together


def test_embedded_default_serves_mock_model(tmp_path):
    """``python -m aisix serve`` with no config: a mock model, keys generated and printed."""
    port, admin = services.free_port(), services.free_port()
    log = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "aisix", "serve", "--data-dir", str(tmp_path / "data"),
                             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={"PATH": "/usr/bin:/bin", "OTEL_SDK_DISABLED": "true"})
    try:
        creds = None
        for _ in range(200):
            out = (tmp_path / "out.log").read_text()
            if "client key:" in out and "curl" in out:
                creds = json.loads((tmp_path / "data" / "credentials.json").read_text())
                break
            time.sleep(0.05)
        assert creds, out
        assert creds["client_key"] in out and creds["admin_key"] in out
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=creds["client_key"], max_retries=0)
        chunks = list(client.chat.completions.create(model="mock", messages=msgs("hi"), stream=True))
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 24
        r = client.chat.completions.create(model="mock", messages=msgs("hi"))
        assert r.usage.completion_tokens == 24 and r.choices[0].message.content
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        log.close()
    assert (tmp_path / "data" / "credentials.json").stat().st_mode & 0o077 == 0


def test_mock_provider_embeddings_with_the_openai_client(tmp_path):
    """The mock model answers embeddings too (base64, the openai client's default, and floats)."""
    cfg = gateway_config("http://127.0.0.1:9/v1", models=[{"name": "mock", "model": "mock/mock-1"}],
                         apikeys=[{"key": "sk-test", "allowed_models": ["mock"]}])
    with GatewayProcess(tmp_path, cfg) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
        r = client.embeddings.create(model="mock", input=["hello", "world"])
        assert len(r.data) == 2 and len(r.data[0].embedding) == 16
        assert r.data[0].embedding != r.data[1].embedding
        again = client.embeddings.create(model="mock", input="hello", encoding_format="float", dimensions=16)
        assert again.data[0].embedding == pytest.approx(r.data[0].embedding, rel=1e-6)
        assert r.usage.prompt_tokens == 2 and r.usage.total_tokens == 2
        for bad in ([], "", None, 5):  # the gateway's own 400, before any upstream call (nothing logged as one)
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="mock", input=bad)
            assert e.value.body["code"] == "invalid_type" and e.value.body["param"] == "input"
        assert "upstream call failed" not in gw.output()
