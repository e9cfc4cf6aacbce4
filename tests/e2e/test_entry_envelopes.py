"""Errors the gateway raises before or around a handler (a compressed body 415, a body over the
limit 413, an unknown path 404, a wrong method 405, a bug 500) come back in the envelope of the
route's API: Anthropic's ``{"type": "error", "error": {"type", "message"}}`` under
``/v1/messages`` (and everything below it), OpenAI's on ``/v1/responses``, ``/v1/chat/completions``
and other paths. — end to end, through a real gateway process (the 500 through one in the test's
process, where a handler can be made to fail)."""
from __future__ import annotations

import aiohttp
import anthropic
import pytest

from aisix.config.loader import Config
from aisix.server.app import MAX_BODY_BYTES
from aisix.server.lifecycle import Server, start_gateway
from tests.support.entry_e2e import emulators, entry_gateway
from tests.support.services import HOST, free_port

ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
OPENAI_ROUTES = ("/v1/responses", "/v1/chat/completions")
KEY = {"x-api-key": "sk-test", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, prometheus):
    with emulators() as (o, a), entry_gateway(tmp_path_factory.mktemp("gw-envelopes"), prometheus, o, a) as proc:
        yield proc


async def _call(method: str, url: str, data: bytes = b"{}", headers: dict | None = None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s, s.request(method, url, data=data, headers={**KEY, **(headers or {})}) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


def anthropic_envelope(doc: dict, etype: str) -> str:
    """Asserts Anthropic's envelope with error type ``etype``; returns the message."""
    assert doc["type"] == "error" and set(doc) == {"type", "error"}, doc
    assert set(doc["error"]) == {"type", "message"} and doc["error"]["type"] == etype, doc
    return doc["error"]["message"]


def openai_envelope(doc: dict, code: str) -> str:
    assert set(doc) == {"error"} and doc["error"]["code"] == code and "type" in doc["error"], doc
    return doc["error"]["message"]


@pytest.mark.parametrize("path", ANTHROPIC_ROUTES + OPENAI_ROUTES)
async def test_compressed_body_is_a_415_in_the_route_envelope(gw, path):
    status, _, doc = await _call("POST", gw.url + path, b"\x1f\x8b not really gzip", {"Content-Encoding": "gzip"})
    assert status == 415
    if path in ANTHROPIC_ROUTES:
        assert "Content-Encoding" in anthropic_envelope(doc, "invalid_request_error")
    else:
        openai_envelope(doc, "unsupported_content_encoding")


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
async def test_body_over_the_limit_is_a_413_in_the_route_envelope(gw, path):
    status, _, doc = await _call("POST", gw.url + path, b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert status == 413
    if path == "/v1/messages":
        assert "too large" in anthropic_envelope(doc, "request_too_large")
    else:
        openai_envelope(doc, "request_too_large")


async def test_unknown_paths_under_messages_are_anthropic_404s_elsewhere_openai(gw):
    with pytest.raises(anthropic.NotFoundError) as e:  # the SDK's batches API: not served by aisix
        anthropic.Anthropic(base_url=gw.url, api_key="sk-test", max_retries=0).messages.batches.list()
    assert "Unknown route: GET /v1/messages/batches" in anthropic_envelope(e.value.body, "not_found_error")
    for path in ("/v1/messagesX", "/v1/responses/resp_1/cancel", "/v1/nope"):
        status, _, doc = await _call("POST", gw.url + path)
        assert status == 404 and openai_envelope(doc, "not_found") == f"Unknown route: POST {path}"


async def test_wrong_method_is_a_405_in_the_route_envelope(gw):
    for path in ANTHROPIC_ROUTES:
        status, headers, doc = await _call("GET", gw.url + path)
        assert status == 405 and headers["Allow"] == "POST"
        assert anthropic_envelope(doc, "invalid_request_error") == f"Method GET is not allowed on {path}"
    status, headers, doc = await _call("PUT", gw.url + "/v1/responses")
    assert status == 405 and headers["Allow"] == "POST" and openai_envelope(doc, "method_not_allowed")


async def test_the_anthropic_sdk_reads_the_middleware_errors(gw):
    """The official client raises its own typed errors with the gateway's message."""
    c = anthropic.Anthropic(base_url=gw.url, api_key="sk-test", max_retries=0,
                            default_headers={"Content-Encoding": "br"})
    with pytest.raises(anthropic.APIStatusError) as e:
        c.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 415 and e.value.type == "invalid_request_error"
    assert "Compressed request bodies" in anthropic_envelope(e.value.body, "invalid_request_error")


# -- a bug in a handler: 500 ------------------------------------------------------------------------
@pytest.fixture
async def inproc(tmp_path):
    """A gateway in this process (what ``serve`` runs), telemetry off, the built-in mock model."""
    listen = f"{HOST}:{free_port()}"
    doc = {"server": {"proxy": {"listen": listen}, "admin": {"listen": f"{HOST}:{free_port()}"}},
           "deployment": {"admin": {"admin_key": [{"key": "admin-key-envelopes"}]}, "config_provider": "file",
                          "file": {"path": str(tmp_path / "resources.json")}},
           "observability": {"enabled": False},
           "models": [{"name": "mocked", "model": "mock/mock-1", "provider_config": {"ttft_ms": 0, "tpot_ms": 0}}],
           "apikeys": [{"key": "sk-test", "allowed_models": ["mocked"]}]}
    gw = await start_gateway(Config.model_validate(doc))
    server = Server(gw)
    await server.start()
    try:
        yield f"http://{listen}"
    finally:
        await server.stop()


async def test_a_handler_bug_is_a_500_in_the_route_envelope(inproc, monkeypatch):
    def broken(*_a, **_kw):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr("aisix.proxy.messages.estimate_input_tokens", broken)  # count_tokens to a non-Anthropic model
    monkeypatch.setattr("aisix.proxy.messages.chat_body", broken)
    monkeypatch.setattr("aisix.proxy.responses.chat_body", broken)
    body = b'{"model":"mocked","max_tokens":5,"input":"x","messages":[{"role":"user","content":"x"}]}'
    for path in ANTHROPIC_ROUTES:
        status, headers, doc = await _call("POST", inproc + path, body)
        assert status == 500 and headers["x-aisix-request-id"]
        assert anthropic_envelope(doc, "api_error") == "The gateway failed to handle the request."
    status, _, doc = await _call("POST", inproc + "/v1/responses", body)
    assert status == 500 and openai_envelope(doc, "internal_error") == "The gateway failed to handle the request."
