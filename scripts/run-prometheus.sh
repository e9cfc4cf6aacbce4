#!/usr/bin/env bash
# run-prometheus.sh [LISTEN] [DATADIR]
# Runs Prometheus in the foreground with its OTLP receiver and exemplar storage on, using the
# top-level prometheus.yml. Defaults: 127.0.0.1:9090 and ./.prometheus-data.
# OTLP push URL: http://LISTEN/api/v1/otlp/v1/metrics
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LISTEN=${1:-127.0.0.1:9090}
DATA=${2:-$ROOT/.prometheus-data}
BIN=$("$ROOT/scripts/prometheus-bin.sh")
FLAG=$("$ROOT/scripts/prometheus-bin.sh" --flag)
mkdir -p "$DATA"
exec "$BIN" --config.file="$ROOT/prometheus.yml" --storage.tsdb.path="$DATA" \
  --web.listen-address="$LISTEN" "$FLAG" --enable-feature=exemplar-storage
