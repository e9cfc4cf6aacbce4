import pytest

from tests.support import services


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    """One real Prometheus (OTLP receiver on) for the whole session: .url, .otlp_url, .query(), .wait_for()."""
    with services.prometheus_server(tmp_path_factory.mktemp("prometheus")) as prom:
        yield prom


@pytest.fixture
def etcd(tmp_path):
    """A real one-member etcd for one test: .endpoint, .host, .port, .stop(), .start()."""
    with services.etcd_server(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def redis(tmp_path):
    """A real redis-server for one test: .url, .port, .pid, .command(...), .stop(), .start()."""
    with services.redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def trace_sink():
    """An in-process OTLP/gRPC trace receiver: .endpoint, .spans, .wait_for(n)."""
    with services.trace_sink() as sink:
        yield sink


@pytest.fixture(scope="module")
def upstream():
    """A scripted OpenAI-compatible upstream on loopback, one per test module (tests.support.harness.ScriptedUpstream)."""
    from tests.support.harness import ScriptedUpstream
    up = ScriptedUpstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def sink():
    """An in-process OTLP/gRPC trace receiver shared by one test module: .endpoint, .spans."""
    with services.trace_sink() as s:
        yield s
