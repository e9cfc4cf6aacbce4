"""``POST /v1/completions`` (legacy text completions) with the official ``openai`` SDK through a
real gateway process: passed through to OpenAI-compatible upstreams (the OpenAI emulator as
``openai`` and ``deepseek``, the built-in ``mock``), streamed and not, a clear 400 for providers
without the API; exact tokens and first-token samples in the real Prometheus; spans named for
each route with its ``gen_ai.operation.name``.
"""
from __future__ import annotations

import json
import time

import anthropic
import openai
import pytest

from tests.support.entry_e2e import emulators, entry_gateway, series
from tests.support.harness import post_raw
from tests.support.provider_e2e import Delta

COMPLETIONS = "/v1/completions"


def tokens(model: str) -> list[tuple[str, dict]]:
    s = series(model)
    return [s["prompt"], s["completion"], s["total"], s["first"]]


@pytest.fixture(scope="module")
def emus():
    with emulators() as pair:
        yield pair


@pytest.fixture(scope="module")
def gw(tmp_path_factory, emus, prometheus, sink):
    with entry_gateway(tmp_path_factory.mktemp("gw-completions"), prometheus, *emus, mock_tokens=5,
                       traces=sink.endpoint) as proc:
        yield proc


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0, timeout=30)


def test_whole(gw, emus):
    o, _ = emus
    o.reply(text=["Hello", " world"], usage={"prompt_tokens": 7, "completion_tokens": 2})
    d = Delta(gw.metrics, tokens("gpt"), COMPLETIONS)
    r = client(gw).completions.create(model="gpt", prompt="Say hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == "Hello world"
    assert r.choices[0].finish_reason == "stop" and r.model == "gpt-3.5-turbo-instruct"  # the emulator's legacy model
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 2, 9)
    assert o.last.path == "/v1/completions"
    assert o.last.json == {"model": "gpt-4o", "prompt": "Say hello", "max_tokens": 5, "temperature": 0}
    d.expect(tokens("gpt")[0], 7)
    d.expect(tokens("gpt")[1], 2)
    d.expect(tokens("gpt")[2], 9)
    d.expect(tokens("gpt")[3], 0)  # not a stream: no first-token sample
    d.expect_status(1)


@pytest.mark.parametrize("model", ["gpt", "ds"])
def test_stream(gw, emus, model):
    o, _ = emus
    o.reply(text=["Once", " upon", " a", " time"], usage={"prompt_tokens": 11, "completion_tokens": 4})
    d = Delta(gw.metrics, tokens(model), COMPLETIONS)
    chunks = list(client(gw).completions.create(model=model, prompt="Tell a story", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once upon a time"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert all(c.choices for c in chunks)  # the usage chunk the gateway asked for is not the client's
    assert o.last.json["stream_options"] == {"include_usage": True}
    d.expect(tokens(model)[0], 11)
    d.expect(tokens(model)[1], 4)
    d.expect(tokens(model)[3], 1)


async def test_stream_bytes_pass_through(gw, emus):
    o, _ = emus
    o.reply(text=["a", "b"], usage={"prompt_tokens": 3, "completion_tokens": 2})
    got = await post_raw(gw.base_url + "/completions", {"model": "gpt", "prompt": "ab", "stream": True,
                                                        "stream_options": {"include_usage": True}})
    assert got.status == 200 and got.body == bytes(o.sent[-1])
    assert json.loads(got.data_events()[-2])["usage"]["total_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True])
def test_mock(gw, stream):
    d = Delta(gw.metrics, tokens("mocked"), COMPLETIONS)
    r = client(gw).completions.create(model="mocked", prompt="hi there", stream=stream,
                                      **({"stream_options": {"include_usage": True}} if stream else {}))
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 5
    else:
        text = r.choices[0].text
    assert text == "Hello from the aisix mock"
    d.expect(tokens("mocked")[1], 5)


@pytest.mark.parametrize("stream", [False, True])
def test_provider_without_the_api_is_400(gw, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).completions.create(model="claude", prompt="hi", stream=stream)
    assert e.value.body["code"] == "unsupported_operation" and e.value.body["type"] == "invalid_request_error"
    assert "anthropic" in e.value.body["message"] and "/v1/chat/completions" in e.value.body["message"]


def test_upstream_error_passes_back(gw, emus):
    o, _ = emus
    o.reply(error=(429, "requests", "Rate limit reached for requests"), headers={"retry-after-ms": "20"})
    with pytest.raises(openai.RateLimitError) as e:
        client(gw).completions.create(model="gpt", prompt="x")
    assert e.value.body["message"] == "Rate limit reached for requests"
    assert e.value.response.headers["retry-after-ms"] == "20"


def test_spans_name_each_route_and_operation(gw, emus, sink):
    """One span per request on each new route, ``http.route`` its template and
    ``gen_ai.operation.name`` as the semantic conventions name it."""
    o, a = emus
    o.reply(text=["x"])
    client(gw).completions.create(model="gpt", prompt="span")
    a.reply(text=["y"])
    anthropic.Anthropic(base_url=gw.url, api_key="sk-test", max_retries=0).messages.create(
        model="claude", max_tokens=5, messages=[{"role": "user", "content": "span"}])
    o.reply(text=["z"])
    client(gw).responses.create(model="ds", input="span")
    routes = {"/v1/completions": "text_completion", "/v1/messages": "chat", "/v1/responses": "chat"}

    def found():
        return {s["attributes"]["http.route"]: s["attributes"] for s in sink.spans
                if s["attributes"].get("http.route") in routes}

    deadline = time.monotonic() + 15
    while len(found()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    spans = found()
    assert {r: spans[r]["gen_ai.operation.name"] for r in spans} == routes
    assert spans["/v1/messages"]["gen_ai.provider.name"] == "anthropic"
    assert spans["/v1/responses"]["gen_ai.provider.name"] == "deepseek"


def test_openapi_documents_every_entry_route():
    """``GET /openapi`` has each entry route aisix.proxy.routes registers, valid, on the proxy listener, with the
    error envelope the route answers in."""
    from aiohttp import web
    from openapi_spec_validator import validate as validate_spec

    from aisix.admin.openapi import openapi_document
    from aisix.proxy.routes import add_routes
    doc = openapi_document()
    validate_spec(doc)
    app = web.Application()
    add_routes(app)
    entry = {"/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/v1/completions"}
    routes = {r.resource.canonical: r.method.lower() for r in app.router.routes() if r.resource.canonical in entry}
    assert set(routes) == entry
    for path, method in routes.items():
        item = doc["paths"][path]
        assert "proxy listener" in item["servers"][0]["description"]
        err = item[method]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert err.endswith("AnthropicError" if path.startswith("/v1/messages") else "/Error")
