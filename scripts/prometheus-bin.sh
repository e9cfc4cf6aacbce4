#!/usr/bin/env bash
# prometheus-bin.sh [--flag] [--no-build]
#
# Prints the path of a Prometheus binary that has the OTLP receiver; with
# --flag, prints the command-line switch that turns the receiver on for it
# (--web.enable-otlp-receiver on 3.x, --enable-feature=otlp-write-receiver on 2.x).
# Looks at, in order: $PROMETHEUS; a `prometheus` on PATH that knows the
# receiver; $HOME/.cache/aisix/prometheus/prometheus-otlp, built once from
# Debian's sources by scripts/build-prometheus-otlp.sh (about 3-5 min)
# unless --no-build is given.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE="$HOME/.cache/aisix/prometheus"
BUILD="$ROOT/scripts/build-prometheus-otlp.sh"

want_flag=0 build=1
for a in "$@"; do
  case "$a" in
    --flag) want_flag=1 ;;
    --no-build) build=0 ;;
    *) echo "usage: $0 [--flag] [--no-build]" >&2; exit 2 ;;
  esac
done

help_of() { "$1" --help 2>&1 || true; }
has_otlp() { local h; h=$(help_of "$1"); [[ $h == *web.enable-otlp-receiver* || $h == *otlp-write-receiver* ]]; }

find_bin() {
  if [ -n "${PROMETHEUS:-}" ]; then
    command -v "$PROMETHEUS" || { echo "prometheus-bin: PROMETHEUS=$PROMETHEUS is not executable" >&2; exit 1; }
    return
  fi
  local p; p=$(command -v prometheus || true)
  if [ -n "$p" ] && has_otlp "$p"; then echo "$p"; return; fi
  p="$CACHE/prometheus-otlp"
  if [ ! -x "$p" ] && [ "$build" = 1 ] && [ -x "$BUILD" ]; then
    echo "prometheus-bin: building $p once (about 3 minutes)..." >&2
    mkdir -p "$CACHE"
    # the lock keeps two concurrent callers from building twice
    flock "$CACHE/.build.lock" "$BUILD" "$CACHE" >&2
  fi
  if [ -x "$p" ]; then echo "$p"; return; fi
  cat >&2 <<MSG
prometheus-bin: no Prometheus with an OTLP receiver found.
Install Prometheus >= 2.47 or 3.x (upstream release; Debian's packages lack the
receiver) and put it on PATH or set PROMETHEUS=/path/to/prometheus, or run
Docker's quay.io/prometheus/prometheus:v3.1.0 with --web.enable-otlp-receiver.
MSG
  [ "$build" = 1 ] && [ ! -x "$BUILD" ] && echo "(the builder $BUILD is absent)" >&2
  [ "$build" = 0 ] && echo "(run 'make services' to build one)" >&2
  exit 1
}

bin=$(find_bin)
if [ "$want_flag" = 0 ]; then echo "$bin"; exit 0; fi
if [[ $(help_of "$bin") == *web.enable-otlp-receiver* ]]; then
  echo "--web.enable-otlp-receiver"
else
  echo "--enable-feature=otlp-write-receiver"
fi
