# aisix: make serve | make test | make prometheus | make bench
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.install.stamp
# root runs apt-get itself; anyone else goes through sudo when there is one
SUDO   := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0
# apt-get install $(1), refreshing the package lists only if the first try fails
apt_install = $(APT) install --no-install-recommends $(1) || { $(APT) update && $(APT) install --no-install-recommends $(1); }

.PHONY: install serve test test-unit services prometheus bench clean distclean

install: $(STAMP)

$(STAMP): setup.cfg $(wildcard pyproject.toml setup.py)
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -e '.[test]'
	touch $@

serve: install
	$(VENV)/bin/python -m aisix serve $(if $(CONFIG),--config $(CONFIG)) $(SERVE_ARGS)

test: install services
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The unit tests alone (tests/unit: no processes, no services; about 25 s)
test-unit: install
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# Real services the tests start on loopback: etcd, redis-server, nginx (bench only), and a
# Prometheus with its OTLP receiver (built once, ~3 min, when none is found).
services:
	@command -v etcd >/dev/null || { $(call apt_install,etcd-server); }
	@command -v etcdctl >/dev/null || { $(call apt_install,etcd-client); }
	@command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || { $(call apt_install,redis-server); }
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { $(call apt_install,nginx-light); } \
		|| echo "make services: warning: nginx-light not installed (only bench needs it)" >&2
	@bin=$$(scripts/prometheus-bin.sh) && flag=$$(scripts/prometheus-bin.sh --flag) && echo "prometheus: $$bin $$flag"

# Foreground Prometheus on 127.0.0.1:9090, OTLP push at /api/v1/otlp/v1/metrics
prometheus:
	scripts/run-prometheus.sh 127.0.0.1:9090 .prometheus-data

bench: install services $(VENV)/.bench.stamp
	$(VENV)/bin/python -m bench $(if $(QUICK),--quick) $(if $(PEERS),--peers)

$(VENV)/.bench.stamp: $(STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check -e '.[test,bench]'
	touch $@

clean:
	rm -rf .prometheus-data .pytest_cache *.egg-info build $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
