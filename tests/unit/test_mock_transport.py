"""aisix.upstream.mock.MockTransport, the ``mock://`` upstream: OpenAI's chat completion,
chunk stream, legacy completion and embeddings shapes, paced by ``provider_config``, reached
through UpstreamPool.send like any other upstream."""
from __future__ import annotations

import orjson

from aisix.config.resources import ProviderConfig
from aisix.sse import SSEParser
from aisix.upstream.pool import UpstreamPool, UpstreamRequest

FAST = ProviderConfig.model_validate({"ttft_ms": 0, "tpot_ms": 0, "tokens": 5})


def _req(path: str, body: dict) -> UpstreamRequest:
    return UpstreamRequest(f"mock://local{path}", {"Content-Type": "application/json"}, orjson.dumps(body))


async def test_a_stream_through_the_pool_is_openai_chunks_with_usage_and_done():
    pool = UpstreamPool()
    body = {"model": "up-model", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "x" * 40}]}
    up = await pool.send(_req("/chat/completions", body), FAST)
    assert up.status == 200 and up.headers["content-type"].startswith("text/event-stream")
    events = SSEParser().feed(b"".join([c async for c in up.iter_chunks()]))
    assert events[-1].data == b"[DONE]"
    chunks = [orjson.loads(e.data) for e in events[:-1]]
    assert {c["model"] for c in chunks} == {"up-model"} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello from the aisix mock"
    assert chunks[-1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    await pool.close()


async def test_whole_legacy_and_embeddings_answers():
    pool = UpstreamPool()
    whole = orjson.loads(await (await pool.send(_req("/chat/completions", {"model": "m", "messages": []}), FAST)).read())
    assert whole["object"] == "chat.completion" and whole["choices"][0]["finish_reason"] == "stop"
    legacy = orjson.loads(await (await pool.send(_req("/completions", {"model": "m", "prompt": "abcd"}), FAST)).read())
    assert legacy["object"] == "text_completion" and legacy["usage"]["prompt_tokens"] == 1
    emb = await pool.send(_req("/embeddings", {"model": "m", "input": ["a", "b"], "dimensions": 3}), FAST)
    doc = orjson.loads(await emb.read())
    assert [len(d["embedding"]) for d in doc["data"]] == [3, 3] and doc["model"] == "m"
    bad = await pool.send(_req("/embeddings", {"model": "m", "input": []}), FAST)
    assert bad.status == 400 and orjson.loads(await bad.read())["error"]["param"] == "input"
    await pool.close()


async def test_max_tokens_caps_the_answer_and_finishes_with_length():
    pool = UpstreamPool()
    for field in ("max_tokens", "max_completion_tokens"):
        doc = orjson.loads(await (await pool.send(_req("/chat/completions", {
            "model": "m", "messages": [], field: 3}), FAST)).read())
        assert doc["usage"]["completion_tokens"] == 3 and doc["choices"][0]["finish_reason"] == "length"
        assert doc["choices"][0]["message"]["content"] == "Hello from the"
    up = await pool.send(_req("/completions", {"model": "m", "prompt": "x", "max_tokens": 2, "stream": True}), FAST)
    events = SSEParser().feed(b"".join([c async for c in up.iter_chunks()]))
    finishes = [orjson.loads(e.data)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes == [None, None, "length"]
    doc = orjson.loads(await (await pool.send(_req("/chat/completions", {
        "model": "m", "messages": [], "max_tokens": 50}), FAST)).read())
    assert doc["usage"]["completion_tokens"] == 5 and doc["choices"][0]["finish_reason"] == "stop"
    await pool.close()
