"""The structured access log (observability.access_log): one JSON line per request, written by the
batcher to a file or standard output; no key, no prompt; a path it can't open is a config error."""
from __future__ import annotations

import json
import subprocess
import sys

from aisix.telemetry.access_log import _PIPE_BUF, _writes
from tests.support.harness import (
    ROLE,
    STOP,
    TXT,
    USAGE,
    GatewayProcess,
    ev,
    gateway_config,
    post_raw,
)

CHAT = "/v1/chat/completions"
PROMPT = "PROMPT-never-logged-7f3a"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
FIELDS = {"time", "method", "route", "status", "model", "deployment", "attempts", "stream", "prompt_tokens",
          "completion_tokens", "total_tokens", "usage_estimated", "cost_usd", "latency_ms", "first_token_ms",
          "trace_id", "request_id"}


def _script(upstream) -> None:
    upstream.script(PROMPT, writes=[(0, ev(ROLE)), (0.05, ev(TXT("a"))), (0.01, ev(STOP)), (0, ev(USAGE(9, 1))),
                                    (0, b"data: [DONE]\n\n")])


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_one_line_per_request_with_its_fields_and_no_secret(tmp_path, upstream):
    _script(upstream)
    path = tmp_path / "access.log"
    cfg = gateway_config(upstream.base_url)
    cfg["observability"]["access_log"] = {"path": str(path)}
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    with GatewayProcess(tmp_path / "gw", cfg) as gw:
        got = await post_raw(gw.url + CHAT, body, headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
        assert got.status == 200
        bad = await post_raw(gw.url + CHAT, body, key="sk-wrong-key-never-logged")
        assert bad.status == 401
    text = path.read_text()
    lines = _lines(text)
    assert len(lines) == len(text.splitlines()) == 3  # the harness's readiness probe, the stream, the 401
    probe, ok, unauth = lines
    assert all(set(doc) == FIELDS for doc in lines)
    assert (probe["method"], probe["route"], probe["status"], probe["model"]) == ("GET", "/v1/models", 401, None)
    assert ok["method"] == "POST" and ok["route"] == CHAT and ok["status"] == 200
    assert ok["model"] == "m1" and ok["deployment"] == got.headers["x-aisix-deployment"] == "m1/default" and ok["attempts"] == 1 and ok["stream"] is True
    assert (ok["prompt_tokens"], ok["completion_tokens"], ok["total_tokens"]) == (9, 1, 10)
    assert ok["trace_id"] == TRACE and ok["request_id"] == got.headers["x-aisix-request-id"]
    assert 0 < ok["first_token_ms"] <= ok["latency_ms"] and ok["first_token_ms"] >= 50
    assert ok["time"].endswith("Z") and ok["cost_usd"] is None  # no price configured: no guess
    assert unauth["status"] == 401 and unauth["model"] is None and unauth["first_token_ms"] is None
    for secret in (PROMPT, "sk-test", "sk-wrong-key-never-logged", "sk-upstream"):
        assert secret not in text


async def test_dash_writes_to_standard_output(tmp_path, upstream):
    _script(upstream)
    cfg = gateway_config(upstream.base_url)
    cfg["observability"]["access_log"] = {"path": "-"}
    with GatewayProcess(tmp_path, cfg) as gw:
        body = {"model": "m1", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
        assert (await post_raw(gw.url + CHAT, body)).status == 200
    lines = _lines(gw.output())
    assert [(d["route"], d["status"]) for d in lines] == [("/v1/models", 401), (CHAT, 200)]


def test_off_by_default(tmp_path, upstream):
    cfg = gateway_config(upstream.base_url)
    with GatewayProcess(tmp_path, cfg) as gw:
        pass
    assert "observability" in cfg and "access_log" not in cfg["observability"]
    assert _lines(gw.output()) == []


def test_a_path_it_cannot_open_is_a_config_error(tmp_path, upstream):
    cfg = gateway_config(upstream.base_url)
    cfg["observability"]["access_log"] = {"path": str(tmp_path / "no-such-dir" / "access.log")}
    gw = GatewayProcess(tmp_path, cfg)
    out = subprocess.run([sys.executable, "-m", "aisix", "serve", "--config", str(gw.config_path)],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert "observability.access_log.path: cannot open" in out.stderr and "Traceback" not in out.stderr


def test_writes_end_on_lines_and_stay_within_pipe_buf():
    lines = [b"x" * n + b"\n" for n in (100, 3000, 1500, 5000, 10, 4095)]
    writes = _writes(lines)
    assert b"".join(writes) == b"".join(lines)
    assert all(w.endswith(b"\n") for w in writes)
    assert all(len(w) <= _PIPE_BUF or w.count(b"\n") == 1 for w in writes)
