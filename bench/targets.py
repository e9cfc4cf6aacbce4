"""Start the services the bench measures (targets) and the ones they need (infra).

Each ``start_*`` returns a :class:`Target` or a :class:`~bench.procs.Proc`,
or raises :class:`~bench.procs.Skip` with the note for the report.
Ports are picked free on 127.0.0.1; every file goes to the run's temp dir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from bench._util import free_port
from bench.procs import Proc, Skip, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CLIENT_KEY = "sk-bench-client"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


@dataclasses.dataclass
class Target:
    name: str
    port: int
    proc: Proc
    note: str = ""


#: ``AISIX_BENCH_BASE``: another checkout of aisix (e.g. a worktree of an older commit); when set, the
#: ``aisix-base`` target runs the gateway from it, telemetry on, beside ``aisix`` in the same run
BASE_ROOT = os.environ.get("AISIX_BENCH_BASE") or None


def _env(root: str = ROOT, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_emulator(tmp: str, name: str, cpus) -> Proc:
    """The upstream emulator (``bench.emulator``) on a free port; ``.port`` is set on the Proc."""
    port = free_port()
    p = Proc(name, [PY, "-m", "bench.emulator", "--port", str(port)], cpus, env=_env(), cwd=ROOT,
             log=os.path.join(tmp, f"{name}.log"))
    p.port = port
    wait_http(f"http://127.0.0.1:{port}/v1/models", p, 10)
    return p


def start_direct(tmp: str, cpus) -> Target:
    """``direct``: a second emulator, on the target's core, measured as the limit."""
    return Target("direct", *_port_proc(start_emulator(tmp, "direct", cpus)))


def _port_proc(p: Proc):
    return p.port, p


def start_prometheus(tmp: str, cpus, allow_build: bool) -> tuple[Proc | None, str]:
    """A real Prometheus with its OTLP receiver; (None, note) when none is found."""
    script = os.path.join(ROOT, "scripts", "prometheus-bin.sh")
    binary, flag = None, "--enable-feature=otlp-write-receiver"
    if os.path.exists(script):
        args = [] if allow_build else ["--no-build"]
        try:
            r = subprocess.run(["bash", script, *args], stdout=subprocess.PIPE, text=True, timeout=600)
            if r.returncode == 0 and r.stdout.strip():
                binary = r.stdout.strip().splitlines()[-1]
                f = subprocess.run(["bash", script, "--flag", "--no-build"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, timeout=60)
                flag = f.stdout.strip() or flag
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not binary:
        cached = os.path.expanduser("~/.cache/aisix/prometheus/prometheus-otlp")
        if os.access(cached, os.X_OK):
            binary = cached
    if not binary:
        return None, "no Prometheus with an OTLP receiver (scripts/prometheus-bin.sh found none): metrics unexported"
    port = free_port()
    d = os.path.join(tmp, "prom")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write("global:\n  scrape_interval: 60s\n")
    p = Proc("prometheus", [binary, f"--config.file={cfg}", f"--storage.tsdb.path={d}/data",
                            f"--web.listen-address=127.0.0.1:{port}", flag], cpus,
             log=os.path.join(tmp, "prometheus.log"))
    p.port = port
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", p, 20)
    except Skip as e:
        p.stop()
        return None, f"Prometheus did not start: {e}"
    return p, ""


def prometheus_query(port: int, q: str) -> float | None:
    """The first value of an instant PromQL query, or None."""
    url = f"http://127.0.0.1:{port}/api/v1/query?query=" + urllib.request.quote(q)
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            res = json.load(r)["data"]["result"]
        return float(res[0]["value"][1]) if res else None
    except Exception:  # noqa: BLE001
        return None


def start_tracesink(tmp: str, cpus) -> Proc | None:
    """The OTLP/gRPC trace sink; None when grpcio is missing (the gateway then exports to a dead port)."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    p = Proc("tracesink", [PY, "-m", "bench.tracesink", "--port", str(port)], cpus, env=_env(), cwd=ROOT,
             log=os.path.join(tmp, "tracesink.log"))
    p.port = port
    return p


#: The key's limits of the driver's aisix targets: every kind a request takes (a count, a
#: concurrency slot, tokens charged at the end), set far above what a run reaches.
BENCH_LIMITS = "{rpm: 1000000000, tpm: 1000000000, concurrency: 1000000}"


def start_redis(tmp: str, cpus) -> Proc:
    """A redis-server (Debian's, from ``make services``) on a free port, no persistence; ``.port`` set."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if not binary:
        raise Skip("redis-server is not installed (make services installs it)")
    port = free_port()
    d = os.path.join(tmp, "redis")
    os.makedirs(d, exist_ok=True)
    p = Proc("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                       "--dir", d], cpus, log=os.path.join(tmp, "redis.log"))
    p.port = port
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16) == b"+PONG\r\n":
                    return p
        except OSError:
            pass
        if time.monotonic() > deadline or not p.alive():
            p.stop()
            raise Skip(f"redis-server did not start: {p.log_tail(3)}")
        time.sleep(0.05)


def start_aisix(tmp: str, name: str, cpus, emu_port: int, prom_port: int | None, trace_port: int,
                telemetry: bool, limits: bool = False, redis_port: int | None = None, root: str = ROOT) -> Target:
    """The gateway, ``python -m aisix serve --config FILE``; ``telemetry=False`` sets OTEL_SDK_DISABLED.
    ``limits`` puts :data:`BENCH_LIMITS` on the key, counted in this process, or in the Redis on
    ``redis_port`` when one is given (``deployment.rate_limit_store.kind: redis``). ``root``: the
    checkout whose ``aisix`` package runs (:data:`BASE_ROOT` for ``aisix-base``)."""
    if not os.path.exists(os.path.join(root, "aisix", "__main__.py")):
        raise Skip("aisix/__main__.py does not exist yet")
    port, admin = free_port(), free_port()
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    prom = f"http://127.0.0.1:{prom_port or free_port()}/api/v1/otlp/v1/metrics"
    cfg = os.path.join(d, "config.yaml")
    store = f', rate_limit_store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/0"}}' if redis_port else ""
    rate_limit = f", rate_limit: {BENCH_LIMITS}" if limits else ""
    with open(cfg, "w") as f:
        f.write(f"""server: {{proxy: {{listen: "127.0.0.1:{port}"}}, admin: {{listen: "127.0.0.1:{admin}"}}}}
deployment: {{admin: {{admin_key: [{{key: "bench-admin"}}]}}, config_provider: file, file: {{path: "{d}/resources.json"}}{store}}}
observability: {{service_name: aisix, metrics: {{otlp_endpoint: "{prom}", export_interval_ms: 5000}}, traces: {{otlp_endpoint: "http://127.0.0.1:{trace_port}"}}}}
models: [{{name: "bench-model", model: "openai/bench-upstream", provider_config: {{api_key: "sk-bench", api_base: "http://127.0.0.1:{emu_port}/v1"}}}}]
apikeys: [{{key: "{CLIENT_KEY}", allowed_models: ["bench-model"]{rate_limit}}}]
""")
    env = _env(root, OTEL_SDK_DISABLED="true") if not telemetry else _env(root)
    py = os.path.join(ROOT, ".venv", "bin", "python")
    p = Proc(name, [py if os.path.exists(py) else PY, "-m", "aisix", "serve", "--config", cfg], cpus, env=env,
             cwd=root, log=os.path.join(d, "aisix.log"))
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", p, 30, AUTH)
    except Skip:
        p.stop()
        raise
    return Target(name, port, p)


def start_nginx(tmp: str, cpus, emu_port: int) -> Target:
    """nginx as a minimal streaming reverse proxy (1 worker, no buffering, upstream keep-alive)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not binary:
        raise Skip("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    d = os.path.join(tmp, "nginx")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    user = "user root;" if os.geteuid() == 0 else ""
    with open(conf, "w") as f:
        f.write(f"""{user}
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream emu {{ server 127.0.0.1:{emu_port}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://emu;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
""")
    p = Proc("nginx", [binary, "-e", f"{d}/error.log", "-p", d, "-c", conf], cpus, log=os.path.join(d, "out.log"))
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", p, 10)
    except Skip:
        p.stop()
        raise
    return Target("nginx", port, p)


def start_litellm(tmp: str, cpus, emu_port: int, allow_install: bool) -> Target:
    """LiteLLM's proxy from PyPI in its own venv (``bench/.venv-litellm``), against the emulator."""
    venv = os.path.join(ROOT, "bench", ".venv-litellm")
    exe = os.path.join(venv, "bin", "litellm")
    if not os.path.exists(exe):
        if not allow_install:
            raise Skip("bench/.venv-litellm is not installed")
        from bench.peers import install_litellm
        install_litellm(venv)
    port = free_port()
    d = os.path.join(tmp, "litellm")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.yaml")
    with open(cfg, "w") as f:
        f.write(f"""model_list:
  - model_name: bench-model
    litellm_params: {{model: openai/bench-upstream, api_base: "http://127.0.0.1:{emu_port}/v1", api_key: sk-bench}}
general_settings: {{master_key: {CLIENT_KEY}}}
litellm_settings: {{drop_params: true, telemetry: false}}
""")
    env = _env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR",
               DISABLE_SCHEMA_UPDATE="true")
    env.pop("PYTHONPATH", None)
    p = Proc("litellm", [exe, "--config", cfg, "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
             cpus, env=env, cwd=d, log=os.path.join(d, "litellm.log"))
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", p, 120, AUTH)
    except Skip:
        p.stop()
        raise
    return Target("litellm", port, p)
