"""What a newcomer trips on: health probes, the Admin API kept out of the proxy's series, the
gateway's own request id on every response (findable in the traces), ``GET /v1/models/{id}``,
and the per-request debug line."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.support.harness import (
    ROLE,
    STOP,
    TXT,
    USAGE,
    GatewayMetrics,
    GatewayProcess,
    ScriptedUpstream,
    ev,
    gateway_config,
    post_raw,
)

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def upstream():
    up = ScriptedUpstream().start()
    up.script("stream", writes=[(0, ev(ROLE)), (0, ev(TXT("hi"))), (0, ev(STOP)), (0, ev(USAGE(3, 1))),
                                (0, b"data: [DONE]\n\n")])
    yield up
    up.stop()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def chat(key: str, stream: bool) -> dict:
    return {"model": "m1", "stream": stream, "messages": [{"role": "user", "content": key}]}


def test_health_probes_and_admin_traffic_stay_out_of_the_proxy_series(tmp_path, upstream, prometheus):
    cfg = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url)
    with GatewayProcess(tmp_path, cfg) as gw:
        for _ in range(3):
            assert get(gw.url + "/livez")[0] == 200
            status, _, body = get(gw.url + "/readyz")
            assert status == 200 and json.loads(body) == {"status": "ready"}
        auth = {"Authorization": "Bearer admin-test-key"}
        assert get(gw.admin_url + "/models", auth)[0] == 200
        assert get(gw.admin_url + "/apikeys")[0] == 401
        m = GatewayMetrics(prometheus, gw.instance)
        m.wait_value("aisix_admin_request_count_total", 2)
        assert m.value("aisix_admin_request_count_total", method="GET", endpoint="/aisix/admin/{kind}",
                       status_code="401") == 1
        time.sleep(1.0)  # a few more exports
        # only the harness's readiness probe (GET /v1/models → 401) is proxy traffic
        assert m.value("aisix_request_count_total") == 1
        assert m.value("aisix_request_latency_milliseconds_count") == 1
        assert prometheus.query('count(aisix_request_count_total{endpoint=~"/livez|/readyz|/aisix.*"})') == []


def test_probe_paths_answer_in_the_envelope_on_both_listeners(tmp_path, upstream):
    """A wrong method on a proxy probe is a 405 in the envelope (not aiohttp's plain text); the
    Admin listener has no probes: /livez there is its 401 (no key) or 404, never a 500."""
    with GatewayProcess(tmp_path, gateway_config(upstream.base_url)) as gw:
        req = urllib.request.Request(gw.url + "/livez", data=b"{}", method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("POST /livez answered 2xx")
        except urllib.error.HTTPError as e:
            assert e.code == 405 and e.headers["Allow"] == "GET,HEAD"
            assert json.loads(e.read())["error"]["code"] == "method_not_allowed"
        admin_root = gw.admin_url.split("/aisix/admin")[0]
        for path in ("/livez", "/readyz"):
            status, _, body = get(admin_root + path)
            assert status == 401 and json.loads(body)["error"]["code"] == "missing_admin_key"
            status, _, body = get(admin_root + path, {"Authorization": "Bearer admin-test-key"})
            assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        assert "Traceback" not in gw.output()


def test_readyz_is_503_while_draining(tmp_path, upstream):
    up = ScriptedUpstream().start()
    up.script("slow", writes=[(0, ev(ROLE))] + [(0.2, ev(TXT("x"))) for _ in range(10)] + [(0, ev(STOP))])
    try:
        cfg = gateway_config(up.base_url)
        gw = GatewayProcess(tmp_path, cfg).start()
        try:
            import asyncio
            import signal

            async def run():
                task = asyncio.create_task(post_raw(gw.url + CHAT, chat("slow", True)))
                await asyncio.sleep(0.5)
                gw.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                # a new connection is refused once listening stops; a probe on the way in sees 503 or no listener
                try:
                    status = await asyncio.to_thread(lambda: get(gw.url + "/readyz")[0])
                except OSError:
                    status = "refused"
                return status, await task
            status, stream = asyncio.run(run())
            assert status in (503, "refused") and status != 200
            assert stream.status == 200 and b"[DONE]" in stream.body
        finally:
            gw.stop()
            gw.kill()
    finally:
        up.stop()


async def test_gateway_request_id_on_errors_and_streams_matches_the_span(tmp_path, upstream, trace_sink):
    cfg = gateway_config(upstream.base_url, traces=trace_sink.endpoint)
    with GatewayProcess(tmp_path, cfg) as gw:
        unauth = await post_raw(gw.url + CHAT, chat("stream", True), key="sk-nope")
        missing = await post_raw(gw.url + "/v1/nowhere", chat("stream", True))
        streamed = await post_raw(gw.url + CHAT, chat("stream", True))
    assert unauth.status == 401 and missing.status == 404 and streamed.status == 200
    ids = [r.headers.get("x-request-id") for r in (unauth, missing, streamed)]
    assert all(ids) and len(set(ids)) == 3, ids
    assert trace_sink.wait_for(4)
    spans = {f"{s['trace_id']}-{s['span_id']}": s for s in trace_sink.spans}
    for rid, status in zip(ids, (401, 404, 200)):
        assert spans[rid]["attributes"]["http.response.status_code"] == status


def test_retrieve_model(tmp_path, upstream):
    models = [{"name": "m1", "model": "openai/up-1", "provider_config": {"api_base": upstream.base_url}},
              {"name": "team/m2", "model": "openai/up-2", "provider_config": {"api_base": upstream.base_url}},
              {"name": "hidden", "model": "openai/up-3", "provider_config": {"api_base": upstream.base_url}}]
    keys = [{"key": "sk-test", "allowed_models": ["m1", "team/m2"]}]
    with GatewayProcess(tmp_path, gateway_config(upstream.base_url, models=models, apikeys=keys)) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
        m = client.models.retrieve("m1")
        assert (m.id, m.object, m.owned_by) == ("m1", "model", "openai")
        assert client.models.retrieve("team/m2").id == "team/m2"
        for name in ("hidden", "nope"):
            with pytest.raises(openai.NotFoundError) as e:
                client.models.retrieve(name)
            assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.base_url, api_key="sk-bad", max_retries=0).models.retrieve("m1")


async def test_debug_log_has_one_line_per_request_without_secrets(tmp_path, upstream):
    cfg = gateway_config(upstream.base_url)
    with GatewayProcess(tmp_path, cfg, args=["--log-level", "debug"]) as gw:
        r = await post_raw(gw.url + CHAT, chat("stream", True))
        rid = r.headers["x-request-id"]
        time.sleep(0.3)
        out = gw.output()
    lines = [ln for ln in out.splitlines() if "aisix.access" in ln and rid in ln]
    assert len(lines) == 1, out
    assert f"POST {CHAT} 200 model=m1" in lines[0] and "ms id=" in lines[0]
    assert "sk-test" not in out and "sk-upstream" not in out


def test_example_config_loads_and_serves_the_mock(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from aisix.config.loader import load_config
    from tests.support.services import HOST, free_port
    example = Path(__file__).resolve().parents[2] / "aisix.example.yaml"
    cfg = load_config(str(example), env={})
    assert {m.name for m in cfg.models} == {"mock", "gpt-4o"} and cfg.apikeys[0].rate_limit.concurrency == 4
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aisix", "serve", "--config", str(example),
                             "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{free_port()}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "OTEL_SDK_DISABLED": "true"})
    try:
        deadline = time.monotonic() + 20
        while not (_listening(port) and get(f"http://{HOST}:{port}/readyz")[0] == 200):
            assert time.monotonic() < deadline and proc.poll() is None, "the example config did not serve"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="sk-client-change-me", max_retries=0)
        r = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(30)


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_listen_errors_are_one_clear_line(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "aisix", "serve", "--listen", "3200"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30, env={"OTEL_SDK_DISABLED": "true"}, check=False)
    assert r.returncode == 2 and r.stderr.strip() == "aisix: --listen: `3200` is not host:port", r.stderr


def test_gateway_request_id_is_always_in_x_aisix_request_id_and_the_debug_line(tmp_path, upstream):
    import asyncio
    upstream.script("own-id", status=200, headers={"Content-Type": "application/json", "x-request-id": "req_up_1"},
                    body=b'{"id":"c","object":"chat.completion","model":"up-1","choices":[{"index":0,"message":'
                    b'{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}')
    with GatewayProcess(tmp_path, gateway_config(upstream.base_url), args=["--log-level", "debug"]) as gw:
        for stream in (False, True):
            got = asyncio.run(post_raw(gw.url + CHAT, chat("own-id" if not stream else "stream", stream)))
            assert got.status == 200
            ours = got.headers["x-aisix-request-id"]
            assert len(ours) == 49 and (stream or got.headers["x-request-id"] == "req_up_1")
            deadline = time.monotonic() + 5
            while f"id={ours}" not in gw.output() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f"id={ours}" in gw.output()
        assert "DEBUG urllib3" not in gw.output() and "DEBUG grpc" not in gw.output()
        bad = asyncio.run(post_raw(gw.url + CHAT, {"model": 123, "messages": [{"role": "user", "content": "x"}]}))
        assert bad.status == 400 and json.loads(bad.body)["error"]["code"] == "invalid_type"
