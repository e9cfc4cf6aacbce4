"""``POST /v1/responses`` (the OpenAI Responses API, stateless subset) end to end: the official
``openai`` SDK through a real gateway process, passed through to OpenAI and translated to the
others; exact tokens in a real Prometheus. The sans-IO translators:
:mod:`tests.unit.test_responses_translation`."""
from __future__ import annotations

import json

import openai
import orjson
import pytest

from tests.support.entry_e2e import emulators, entry_gateway, series
from tests.support.provider_e2e import Delta
from tests.unit.test_responses_stream_interleaving import _events, well_formed
from tests.unit.test_responses_translation import RESPONSES, WEATHER


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emus():
    with emulators() as pair:
        yield pair


@pytest.fixture(scope="module")
def gw(tmp_path_factory, emus, prometheus):
    with entry_gateway(tmp_path_factory.mktemp("gw-responses"), prometheus, *emus, mock_tokens=3) as proc:
        yield proc


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0, timeout=30)


def delta(gw, model: str, status: str = "200") -> Delta:
    return Delta(gw.metrics, list(series(model).values()), RESPONSES, status)


def test_passthrough_whole_bytes_and_stateful_features(gw, emus):
    o, _ = emus
    o.reply(text=["Hello."], usage={"prompt_tokens": 12, "completion_tokens": 3})
    d = delta(gw, "gpt")
    raw = client(gw).responses.with_raw_response.create(model="gpt", input="hi", previous_response_id="resp_abc",
                                                        store=True, tools=[{"type": "web_search"}])
    sent = raw.http_response.request.content
    assert o.last.path == "/v1/responses" and o.last.raw == sent.replace(b'"model":"gpt"', b'"model":"gpt-4o"')
    assert raw.http_response.content == bytes(o.sent[-1])
    assert raw.parse().output_text == "Hello."
    d.expect(series("gpt")["prompt"], 12)
    d.expect(series("gpt")["completion"], 3)
    d.expect(series("gpt")["total"], 15)


def test_passthrough_stream_bytes_and_first_token(gw, emus):
    o, _ = emus
    o.reply(text=["Sun", "ny"], tool_calls=[("get_weather", {"city": "Oslo"})],
            usage={"prompt_tokens": 20, "completion_tokens": 6})
    d = delta(gw, "gpt")
    with client(gw).responses.with_streaming_response.create(model="gpt", input="Weather?", tools=[WEATHER],
                                                             stream=True) as resp:
        body = resp.read()
    assert body == bytes(o.sent[-1])
    d.expect(series("gpt")["prompt"], 20)
    d.expect(series("gpt")["completion"], 6)
    d.expect(series("gpt")["first"], 1)


def test_passthrough_mid_stream_error_event(gw, emus):
    o, _ = emus
    o.reply(text=["a", "b", "c"], error_after=3)
    d = delta(gw, "gpt", status="502")
    events = list(client(gw).responses.create(model="gpt", input="x", stream=True))
    assert events[-1].type == "error" and events[-1].code == "server_error"
    assert events[-1].message == "The server had an error"
    d.expect_status(1)
    o.reply(text=["a", "b", "c"], error_after=3)
    with client(gw).responses.with_streaming_response.create(model="gpt", input="x", stream=True) as resp:
        assert resp.read() == bytes(o.sent[-1])  # the error event too, as the upstream sent it


@pytest.mark.parametrize("stream", [False, True])
def test_translated_function_call_round_trip(gw, emus, stream):
    o, _ = emus
    o.reply(thinking=["Need weather."], tool_calls=[("get_weather", {"city": "Lima"})], text=[],
            usage={"prompt_tokens": 25, "completion_tokens": 8})
    d = delta(gw, "ds")
    c = client(gw)
    if stream:
        with c.responses.stream(model="ds", input="Weather in Lima?", tools=[WEATHER], instructions="Brief.") as s:
            kinds = [ev.type for ev in s]
            first = s.get_final_response()
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert "response.function_call_arguments.delta" in kinds
    else:
        first = c.responses.create(model="ds", input="Weather in Lima?", tools=[WEATHER], instructions="Brief.")
    assert first.status == "completed" and first.usage.input_tokens == 25 and first.usage.output_tokens == 8
    assert [i.type for i in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Lima"}
    sent = o.last.json
    assert o.last.path == "/v1/chat/completions" and sent["model"] == "deepseek-chat"
    assert sent["messages"] == [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Weather in Lima?"}]
    assert sent["tools"] == [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description",
                                                                                         "parameters")}}]
    assert sent.get("stream", False) is stream
    d.expect(series("ds")["prompt"], 25)
    d.expect(series("ds")["completion"], 8)
    d.expect(series("ds")["first"], 1 if stream else 0)

    o.reply(text=["Lima: 18 C."], usage={"prompt_tokens": 40, "completion_tokens": 5})
    follow = [{"role": "user", "content": "Weather in Lima?"}, *[i.model_dump(exclude_none=True) for i in first.output],
              {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}]
    if stream:
        with c.responses.stream(model="ds", input=follow, tools=[WEATHER]) as s:
            text = "".join(ev.delta for ev in s if ev.type == "response.output_text.delta")
            second = s.get_final_response()
        assert text == "Lima: 18 C."
    else:
        second = c.responses.create(model="ds", input=follow, tools=[WEATHER])
    assert second.output_text == "Lima: 18 C."
    assert o.last.json["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C"}]
    d.expect(series("ds")["prompt"], 65)


@pytest.mark.parametrize("stream", [False, True])
def test_translated_to_anthropic(gw, emus, stream):
    _, a = emus
    a.reply(text=["Bon", "jour"], usage={"input_tokens": 9, "cache_read_input_tokens": 2, "output_tokens": 2})
    d = delta(gw, "claude")
    if stream:
        with client(gw).responses.stream(model="claude", input="hi", max_output_tokens=50) as s:
            r = s.get_final_response()
    else:
        r = client(gw).responses.create(model="claude", input="hi", max_output_tokens=50)
    assert r.output_text == "Bonjour" and r.usage.input_tokens == 11 and r.usage.input_tokens_details.cached_tokens == 2
    assert a.last.json["max_tokens"] == 50 and a.last.json["messages"] == [{"role": "user", "content": "hi"}]
    d.expect(series("claude")["prompt"], 11)
    d.expect(series("claude")["completion"], 2)


def test_translated_to_mock(gw):
    r = client(gw).responses.create(model="mocked", input="hi")
    assert r.output_text == "Hello from the" and r.usage.output_tokens == 3


def test_errors_in_openai_envelope(gw):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).responses.create(model="ds", input="hi", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "unsupported_parameter"
    assert "previous_response_id" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).responses.create(model="ds", input="hi", tools=[{"type": "file_search", "vector_store_ids": ["v"]}])
    assert e.value.body["param"] == "tools[0]" and "file_search" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).responses.create(model="nope", input="hi")
    assert e.value.body["code"] == "model_not_found"


# -- interleaved parallel tool calls from a chat upstream -------------------------------------------
WEATHER_AND_TIME = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Paris"})]
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}


def test_interleaved_tool_calls_reach_the_sdk_whole(gw, emus):
    """The emulator opens both calls, sends the text, then the calls' fragments round robin; each
    call's ``.done`` events carry its whole arguments and no delta follows them, both through
    ``create(stream=True)`` and ``responses.stream``."""
    o, _ = emus
    o.reply(text=["Both", " at once."], tool_calls=WEATHER_AND_TIME, interleave=True)
    with client(gw).responses.with_streaming_response.create(
            model="ds", input="Weather and time in Paris?", tools=[WEATHER, TIME], stream=True) as resp:
        data = resp.read()
    chunks = [orjson.loads(line[6:]) for line in bytes(o.sent[-1]).split(b"\n\n") if line.startswith(b"data: {")]
    order = [(tc["index"], "name" in tc["function"]) for c in chunks if c["choices"]
             for tc in c["choices"][0]["delta"].get("tool_calls", ())]
    assert order.index((0, False)) > order.index((1, True))  # the upstream did interleave
    items = well_formed(_events(data))
    assert [(it["type"], it.get("name")) for it in items.values()] == [
        ("function_call", "get_weather"), ("function_call", "get_time"), ("message", None)]
    assert [json.loads(items[i]["text"]) for i in (0, 1)] == [args for _, args in WEATHER_AND_TIME]

    o.reply(text=["Both", " at once."], tool_calls=WEATHER_AND_TIME, interleave=True)
    events = list(client(gw).responses.create(model="ds", input="Weather and time in Paris?",
                                              tools=[WEATHER, TIME], stream=True))
    done, late = {}, []  # per output index the .done event's arguments; deltas after it
    for e in events:
        if e.type == "response.function_call_arguments.done":
            done[e.output_index] = json.loads(e.arguments)
        elif e.type == "response.function_call_arguments.delta" and e.output_index in done:
            late.append(e)
    assert late == [] and done == {0: WEATHER_AND_TIME[0][1], 1: WEATHER_AND_TIME[1][1]}

    o.reply(text=["Both", " at once."], tool_calls=WEATHER_AND_TIME, interleave=True)
    with client(gw).responses.stream(model="ds", input="Weather and time in Paris?", tools=[WEATHER, TIME]) as s:
        snapshots = {e.output_index: e.snapshot for e in s if e.type == "response.function_call_arguments.delta"}
        final = s.get_final_response()
    assert {k: json.loads(v) for k, v in snapshots.items()} == {0: WEATHER_AND_TIME[0][1], 1: WEATHER_AND_TIME[1][1]}
    assert [(c.name, json.loads(c.arguments)) for c in final.output if c.type == "function_call"] == WEATHER_AND_TIME
    assert final.output_text == "Both at once." and final.status == "completed"
