"""The OpenAI provider's request body: which ``stream_options`` go upstream under each
``provider_config.stream_usage`` (:meth:`aisix.providers.openai.OpenAIProvider.chat_request`)."""
from __future__ import annotations

import orjson
import pytest

from aisix.config.resources import Model
from aisix.errors import GatewayError
from aisix.providers.openai import OpenAIProvider

ASKED = {"include_usage": True, "x": 1}  # the client's own stream_options


def model(mode: str) -> Model:
    return Model(name="m", model="openai/up-1", provider_config={"api_base": "http://127.0.0.1:9/v1",
                                                                  "stream_usage": mode})


def sent(provider: OpenAIProvider, m: Model, body: dict, stream: bool = True) -> dict:
    return orjson.loads(provider.chat_request(m, body, stream, {}).body)


@pytest.mark.parametrize("client_opts", [None, ASKED, {"include_usage": False}])
def test_never_sends_no_stream_options_not_even_the_clients(client_opts):
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            **({"stream_options": client_opts} if client_opts is not None else {})}
    out = sent(OpenAIProvider(), model("never"), body)
    assert "stream_options" not in out and out["model"] == "up-1" and out["stream"] is True
    assert body.get("stream_options") == client_opts  # the client's body is not changed


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_auto_and_always_merge_include_usage_into_the_clients(mode):
    body = {"model": "m", "stream": True, "messages": [], "stream_options": {"include_usage": False, "x": 1}}
    assert sent(OpenAIProvider(), model(mode), body)["stream_options"] == {"include_usage": True, "x": 1}


def test_auto_after_a_refusal_sends_none_and_a_non_stream_is_passed_as_is():
    p, m = OpenAIProvider(), model("auto")
    refusal = GatewayError(400, "Unrecognized request argument supplied: stream_options", "invalid_request_error")
    assert p.refused_stream_options(m, refusal)
    assert "stream_options" not in sent(p, m, {"model": "m", "stream": True, "messages": [], "stream_options": ASKED})
    whole = {"model": "m", "messages": [], "stream_options": ASKED}  # not a stream: the body as the client sent it
    assert sent(p, model("never"), whole, stream=False)["stream_options"] == ASKED
