"""The config file: bad files stop start-up with a message naming the file and the field;
OTEL_* variables override the file; nothing is half-started."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from aisix.config.loader import ConfigError, load_config
from tests.support import services


def write(tmp_path, text: str):
    p = tmp_path / "aisix.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,field,fault", [
    ('server:\n  proxy: {listen: "nope"}\n', "server.proxy.listen", "not host:port"),
    ('models:\n  - {name: a, model: "foo/bar"}\n', "models.0.model", "unknown provider `foo`"),
    ("models:\n  - {name: a}\n", "models.0.model", "Field required"),
    ("apikeys:\n  - {key: k, allowed_models: notalist}\n", "apikeys.0.allowed_models", "valid list"),
    ("observability:\n  metrics: {export_interval_ms: -5}\n", "observability.metrics.export_interval_ms", "greater than"),
    ("deployment:\n  config_provider: redis\n", "deployment.config_provider", "'file' or 'etcd'"),
    ("serverr: {}\n", "serverr", "unknown field"),
    ("deployment:\n  rate_limit_store: {kind: memcached}\n", "deployment.rate_limit_store.kind", "'local' or 'redis'"),
    ('deployment:\n  rate_limit_store: {kind: redis, url: "http://x:1"}\n', "deployment.rate_limit_store.url",
     "redis://, rediss:// or unix://"),
    ("deployment:\n  rate_limit_store: {on_store_error: maybe}\n", "deployment.rate_limit_store.on_store_error",
     "'allow' or 'deny'"),
    ("deployment:\n  rate_limit_store: {lease_ttl_ms: 10}\n", "deployment.rate_limit_store.lease_ttl_ms",
     "greater than or equal to 100"),
    ('models:\n  - {name: a, model: "openai/x"}\n  - {name: a, model: "openai/y"}\n', "models.1.name", "duplicate"),
    # integers past int64 (JSON stores, etcd, OTLP and Redis hold no more) crashed start-up with a traceback
    (f"apikeys:\n  - {{key: k, allowed_models: [], rate_limit: {{rpm: {10**30}}}}}\n",
     "apikeys.0.rate_limit.rpm", "less than or equal to 9223372036854775807"),
    (f'models:\n  - {{name: a, model: "openai/x", provider_config: {{read_timeout_ms: {10**30}}}}}\n',
     "models.0.provider_config.read_timeout_ms", "less than or equal to"),
    (f"server:\n  shutdown_grace_ms: {10**30}\n", "server.shutdown_grace_ms", "less than or equal to"),
    # fallbacks: each names another model of the file, and none leads back (issue 11)
    ('models:\n  - {name: a, model: "openai/x", fallbacks: [a]}\n', "models.0.fallbacks.0", "this model itself"),
    ('models:\n  - {name: a, model: "openai/x", fallbacks: [b]}\n', "models.0.fallbacks.0", "unknown model `b`"),
    ('models:\n  - {name: a, model: "openai/x", fallbacks: [b]}\n  - {name: b, model: "openai/y", fallbacks: [a]}\n',
     "models.1.fallbacks.0", "a cycle (b → a → b)"),
    # model names that differ only by surrounding whitespace made look-alike series
    ('models:\n  - {name: "m1 ", model: "openai/x"}\n', "models.0.name", "must not start or end with whitespace"),
    ('apikeys:\n  - {key: k, allowed_models: [" m1"]}\n', "apikeys.0.allowed_models.0", "must not start or end with whitespace"),
])
def test_bad_config_names_file_field_and_fault(tmp_path, text, field, fault):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path), env={})
    msg = str(e.value)
    assert str(path) in msg and f"`{field}`" in msg and fault in msg, msg


def test_an_rpm_of_1e30_is_a_config_error_from_the_cli_not_a_traceback(tmp_path):
    path = write(tmp_path, f'deployment:\n  file: {{path: "{tmp_path}/r.json"}}\nmodels:\n'
                           f'  - {{name: a, model: "mock/x", rate_limit: {{rpm: {10**30}}}}}\n')
    r = subprocess.run([sys.executable, "-m", "aisix", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=30, env={"OTEL_SDK_DISABLED": "true"}, check=False)
    assert r.returncode == 2 and "models.0.rate_limit.rpm" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_rate_limit_store_defaults_to_local_counters(tmp_path):
    store = load_config(str(write(tmp_path, "{}\n")), env={}).deployment.rate_limit_store
    assert (store.kind, store.url, store.key_prefix, store.on_store_error, store.lease_ttl_ms, store.timeout_ms) == \
        ("local", "redis://127.0.0.1:6379/0", "aisix:", "allow", 10_000, 500)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(write(tmp_path, "a: [\n")), env={})
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(str(tmp_path / "missing.yaml"), env={})


def test_otel_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, 'observability:\n  service_name: x\n  metrics: {otlp_endpoint: "http://a/m"}\n'
                           '  traces: {otlp_endpoint: "http://a:1"}\n')
    cfg = load_config(str(path), env={"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://b/v1/metrics",
                                      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317",
                                      "OTEL_SERVICE_NAME": "gw", "OTEL_SDK_DISABLED": "true"})
    obs = cfg.observability
    assert (obs.metrics.otlp_endpoint, obs.traces.otlp_endpoint, obs.service_name, obs.enabled) == (
        "http://b/v1/metrics", "http://b:4317", "gw", False)
    assert load_config(str(path), env={}).observability.service_name == "x"


def test_cli_exits_with_the_message_and_starts_nothing(tmp_path):
    path = write(tmp_path, 'models:\n  - {name: a, model: "foo/bar"}\n')
    r = subprocess.run([sys.executable, "-m", "aisix", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and str(path) in r.stderr and "models.0.model" in r.stderr


def test_port_in_use_fails_cleanly_and_leaves_no_listener(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    proxy_port = services.free_port()
    path = write(tmp_path, f'server:\n  proxy: {{listen: "127.0.0.1:{proxy_port}"}}\n'
                           f'  admin: {{listen: "127.0.0.1:{port}"}}\n'
                           f'deployment:\n  file: {{path: "{tmp_path}/r.json"}}\n')
    try:
        r = subprocess.run([sys.executable, "-m", "aisix", "serve", "--config", str(path)],
                           capture_output=True, text=True, timeout=30, env={"OTEL_SDK_DISABLED": "true"})
    finally:
        busy.close()
    assert r.returncode == 1 and "cannot start" in r.stderr, r.stderr
    with socket.socket() as s:  # the proxy port it bound first was released with the process
        s.bind(("127.0.0.1", proxy_port))


def test_otel_traces_sampler_variables(tmp_path):
    path = write(tmp_path, "observability:\n  traces: {sample_ratio: 0.5}\n")
    assert load_config(str(path), env={}).observability.traces.sample_ratio == 0.5
    ratio = load_config(str(path), env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                        "OTEL_TRACES_SAMPLER_ARG": "0.25"}).observability.traces.sample_ratio
    assert ratio == 0.25
    assert load_config(str(path), env={"OTEL_TRACES_SAMPLER": "always_off"}).observability.traces.sample_ratio == 0
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
        load_config(str(path), env={"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"})


def test_otel_exporter_variables_turn_the_pushes_off(tmp_path):
    """``OTEL_METRICS_EXPORTER`` / ``OTEL_TRACES_EXPORTER``: ``none`` turns that push off (as a
    null ``otlp_endpoint`` does in the file), ``otlp`` keeps it, anything else is a clear error
    naming the variable."""
    path = write(tmp_path, "observability:\n  traces: {otlp_endpoint: null}\n")
    obs = load_config(str(path), env={}).observability
    assert (obs.metrics.otlp_endpoint, obs.traces.otlp_endpoint) == ("http://127.0.0.1:9090/api/v1/otlp/v1/metrics", None)
    obs = load_config(str(path), env={"OTEL_METRICS_EXPORTER": "None", "OTEL_TRACES_EXPORTER": "otlp"}).observability
    assert (obs.metrics.otlp_endpoint, obs.traces.otlp_endpoint) == (None, None)
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: 'zipkin' is not supported"):
        load_config(str(path), env={"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="otlp_endpoint"):  # an empty string is not "off"
        load_config(str(write(tmp_path, "observability:\n  metrics: {otlp_endpoint: ''}\n")), env={})


@pytest.mark.parametrize("url, says", [
    ("redis://:pw-SECRET@127.0.0.1:notaport/0", "Port could not be cast"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://[::1:6379/0", "Invalid IPv6 URL"),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", "socket_timeout"),
    ("redis://127.0.0.1:6379/abc", "the database must be a number"),
    ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem", "no such file: /nonexistent/ca.pem"),
])
def test_a_redis_url_the_limiter_cannot_use_is_a_config_error(tmp_path, url, says):
    """Found by attacking a gateway: these started with a traceback (or, for the database, used db 0)."""
    path = write(tmp_path, f'deployment:\n  rate_limit_store: {{kind: redis, url: "{url}"}}\n')
    with pytest.raises(ConfigError, match="deployment.rate_limit_store.url") as ei:
        load_config(str(path), env={})
    assert says in str(ei.value) and "SECRET" not in str(ei.value)


def test_null_models_and_apikeys_mean_empty_lists(tmp_path):
    cfg = load_config(str(write(tmp_path, "models:\napikeys:\n")), env={})
    assert cfg.models == [] and cfg.apikeys == []


def test_cli_version_and_bad_log_level(tmp_path):
    from aisix import __version__
    r = subprocess.run([sys.executable, "-m", "aisix", "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == f"aisix {__version__}"
    r = subprocess.run([sys.executable, "-m", "aisix", "serve", "--log-level", "foo"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "invalid choice: 'FOO'" in r.stderr and "Traceback" not in r.stderr
