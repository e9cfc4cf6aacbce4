"""Real services for tests, on loopback with free ports, stopped by PID.

    with prometheus_server(tmp_path) as prom: prom.query("up")
    with etcd_server(tmp_path) as etcd: etcd.stop(); etcd.start()
    with redis_server(tmp_path) as redis: redis.url; redis.stop(); redis.start()
    with trace_sink() as sink: sink.wait_for(1); sink.spans

The binaries come from `make services`; when one is missing the test fails
(pytest.fail) and says so, it is never skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from tests.support.otlp_trace_sink import TraceSink, serve

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _Process:
    """One server process: started, checked ready by `ready()`, stopped by PID."""

    def __init__(self, name: str, cmd: list[str], log: Path, ready: Callable[[], bool], env=None):
        self.name, self.cmd, self.log, self.ready, self.env = name, cmd, log, ready, env
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 20.0) -> None:
        if self.proc and self.proc.poll() is None:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if self.ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not become ready: {' '.join(self.cmd)}\n--- {self.log} ---\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _missing(what: str, detail: str = "") -> None:
    pytest.fail(f"{what} not found: run `make services` first.{' ' + detail if detail else ''}", pytrace=False)


# --- Prometheus (with its OTLP receiver) ------------------------------------

class PromQLError(Exception):
    pass


class Prometheus:
    def __init__(self, url: str, process: _Process):
        self.url = url
        self.otlp_url = f"{url}/api/v1/otlp/v1/metrics"
        self.process = process

    def query(self, promql: str) -> list:
        """Instant query at now; returns data.result (raises PromQLError on a bad query)."""
        body = urllib.parse.urlencode({"query": promql}).encode()
        req = urllib.request.Request(f"{self.url}/api/v1/query", data=body)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            doc = json.loads(e.read() or b"{}")
        if doc.get("status") != "success":
            raise PromQLError(f"{promql!r}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]["result"]

    def exemplars(self, promql: str, since_s: float = 600) -> list:
        """/api/v1/query_exemplars over the last ``since_s`` seconds: [{seriesLabels, exemplars: [...]}]."""
        now = time.time()
        q = urllib.parse.urlencode({"query": promql, "start": now - since_s, "end": now + 5})
        with urllib.request.urlopen(f"{self.url}/api/v1/query_exemplars?{q}", timeout=10) as r:
            doc = json.load(r)
        if doc.get("status") != "success":
            raise PromQLError(f"{promql!r}: {doc.get('error')}")
        return doc["data"]

    def wait_for(self, promql: str, predicate: Callable[[list], bool] = bool, timeout: float = 10.0) -> list:
        """Polls `promql` until predicate(result) is true; returns that result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting on {promql!r}; last result: {result}")
            time.sleep(0.1)


def _prometheus_binary() -> tuple[str, str]:
    script = str(ROOT / "scripts" / "prometheus-bin.sh")
    out = [subprocess.run([script, *args, "--no-build"], capture_output=True, text=True)
           for args in ([], ["--flag"])]
    if any(r.returncode for r in out):
        _missing("A Prometheus with an OTLP receiver", out[0].stderr.strip())
    return out[0].stdout.strip(), out[1].stdout.strip()


@contextlib.contextmanager
def prometheus_server(tmp_path, scrape: list[str] = ()):
    """Prometheus on a free loopback port (OTLP receiver and exemplar storage on), with the
    repository's prometheus.yml; with ``scrape``
    (``host:port`` targets), a config of its own that also scrapes them every second (job ``scrape``)."""
    binary, flag = _prometheus_binary()
    tmp = Path(tmp_path)
    tmp.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{free_port()}"
    config = ROOT / "prometheus.yml"
    if scrape:
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [
            {"job_name": "scrape", "scrape_interval": "1s", "static_configs": [{"targets": list(scrape)}]}]}))
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'prometheus-data'}",
           f"--web.listen-address={url.removeprefix('http://')}", flag, "--enable-feature=exemplar-storage"]
    proc = _Process("prometheus", cmd, tmp / "prometheus.log", lambda: _get(f"{url}/-/ready")[0] == 200)
    proc.start()
    try:
        yield Prometheus(url, proc)
    finally:
        proc.stop()


# --- etcd ----------------------------------------------------------------------

class Etcd:
    """A one-member etcd; stop() and start() keep its port and data dir."""

    def __init__(self, binary: str, data_dir: Path):
        self.host, self.port, peer = HOST, free_port(), f"http://{HOST}:{free_port()}"
        self.endpoint = f"http://{self.host}:{self.port}"
        self.data_dir = data_dir
        cmd = [binary, "--name", "default", "--data-dir", str(data_dir), "--logger", "zap",
               "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"default={peer}"]
        env = dict(os.environ)
        if platform.machine() == "aarch64":
            env.setdefault("ETCD_UNSUPPORTED_ARCH", "arm64")  # etcd 3.4 wants this on arm64
        self.process = _Process("etcd", cmd, data_dir.parent / "etcd.log", self._healthy, env)

    def _healthy(self) -> bool:
        status, body = _get(f"{self.endpoint}/health")
        return status == 200 and json.loads(body).get("health") == "true"

    @property
    def running(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()


@contextlib.contextmanager
def etcd_server(tmp_path):
    binary = os.environ.get("ETCD") or shutil.which("etcd")
    if not binary:
        _missing("etcd", "(Debian package etcd-server)")
    tmp = Path(tmp_path)
    tmp.mkdir(parents=True, exist_ok=True)
    etcd = Etcd(binary, tmp / "etcd-data")
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.stop()
        # its WAL is preallocated in 64 MB files: pytest keeps the last three runs' temp dirs,
        # which would hold ~3 GB of them each
        shutil.rmtree(tmp / "etcd-data", ignore_errors=True)


# --- Redis ----------------------------------------------------------------------------

class RedisServer:
    """A redis-server on a free loopback port, no persistence; stop() and start() keep the port
    (a restart comes back empty, as a Redis without persistence does)."""

    def __init__(self, binary: str, tmp: Path):
        self.host, self.port = HOST, free_port()
        self.url = f"redis://{self.host}:{self.port}/0"
        cmd = [binary, "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
               "--dir", str(tmp), "--protected-mode", "yes"]
        self.process = _Process("redis-server", cmd, tmp / "redis.log", self._ping)

    def _ping(self) -> bool:
        return self.command("PING") == b"+PONG\r\n"

    def command(self, *args: str) -> bytes:
        """One command over a new connection; the raw RESP reply (first read)."""
        with socket.create_connection((self.host, self.port), timeout=2) as s:
            s.sendall(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args))
            return s.recv(65536)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()


@contextlib.contextmanager
def redis_server(tmp_path):
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if not binary:
        _missing("redis-server", "(Debian package redis-server)")
    tmp = Path(tmp_path)
    tmp.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- OTLP gRPC trace receiver (in-process) --------------------------------------

@contextlib.contextmanager
def trace_sink():
    """An OTLP/gRPC trace receiver in this process; `.endpoint` is for OTLPSpanExporter."""
    sink = TraceSink()
    port = free_port()
    server = serve(sink, f"{HOST}:{port}")
    sink.endpoint = f"http://{HOST}:{port}"
    try:
        yield sink
    finally:
        server.stop(0).wait()
