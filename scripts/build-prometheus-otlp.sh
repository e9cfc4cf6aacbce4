#!/usr/bin/env bash
# build-prometheus-otlp.sh DEST_DIR
#
# Debian's prometheus packages (bookworm 2.42, trixie 2.53.3, forky/sid 3.5.3)
# are all built WITHOUT the OTLP receiver (trixie: debian/patches/
# 0019-Disable-OTLP-Ingestion-endpoint.patch, "depends on code not yet in
# Debian"). This script rebuilds Debian trixie's prometheus 2.53.3+ds1-2 from
# its Debian source with that one patch left out, using ONLY Debian packages:
#   - Go 1.24 toolchain and ~430 golang-*-dev source packages from trixie,
#   - go.opentelemetry.io/collector/{pdata,featuregate,client} from forky's
#     golang-opentelemetry-collector-dev (the missing piece),
# all fetched with a throwaway apt state (system apt/dpkg untouched) and
# unpacked with dpkg -x; the build runs in GOPATH mode like dh-golang.
# Two small adaptations: pdata's gRPC service file (needs grpc >= 1.66, trixie
# has 1.64; Prometheus only uses OTLP/HTTP) is dropped, and the 3 semconv
# constants Prometheus uses get a stub package.
#
# Result: DEST_DIR/prometheus-otlp, accepting
#   --enable-feature=otlp-write-receiver  -> POST /api/v1/otlp/v1/metrics
# Idempotent: exits at once if DEST_DIR/prometheus-otlp exists and knows the flag.
# Env: WORK (default /tmp/prom-otlp-build: the downloads and the build, ~2.5 GB with the Go build
#      cache; after a build only the .debs, 174 MB, are kept there unless KEEP_WORK=1; go writes
#      nothing to the home: its telemetry counters go under WORK too),
#      COLLECTOR_SUITE (default forky; sid also has the package), NICE (default 19)
#      COLLECTOR_DEB=/path/to/golang-opentelemetry-collector-dev_*.deb (default: the copy
#        of Debian forky's 0.141.0-2 kept in scripts/debs/, checked by its sha256 below;
#        forky is a moving target, so the project carries the one version it was built with)
# Needs: apt-get, dpkg, patch, xz, flock (installed with apt-get when missing).
set -euo pipefail
DEST=${1:?usage: build-prometheus-otlp.sh DEST_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
PINNED_DEB="$HERE/debs/golang-opentelemetry-collector-dev_0.141.0-2_all.deb"
PINNED_SHA256=772f123b7f5d98f5a9314f8140b3853c2e3e44b35b4b26a84c4773f324ab57ac
if [ -z "${COLLECTOR_DEB:-}" ] && [ -f "$PINNED_DEB" ]; then
  echo "$PINNED_SHA256  $PINNED_DEB" | sha256sum -c --quiet - \
    || { echo "build-prometheus-otlp: $PINNED_DEB does not match its sha256" >&2; exit 1; }
  COLLECTOR_DEB="$PINNED_DEB"
fi
# the tools this script runs, from Debian's packages when missing (root or sudo)
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
need=()
for t in apt-get:apt dpkg:dpkg patch:patch xz:xz-utils flock:util-linux sha256sum:coreutils; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -y -q install --no-install-recommends "${need[@]}" \
    || { $SUDO apt-get -q update && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -y -q install --no-install-recommends "${need[@]}"; }
fi
WORK=${WORK:-${TMPDIR:-/tmp}/prom-otlp-build}
COLLECTOR_SUITE=${COLLECTOR_SUITE:-forky}
NICE=${NICE:-19}
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $2 !~ /^\[/ && /debian\/? /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PROM_SRC_VERSION=${PROM_SRC_VERSION:-2.53.3+ds1-2}
mkdir -p "$DEST"; DEST=$(cd "$DEST" && pwd)
OUT="$DEST/prometheus-otlp"

has_otlp() { local h; h=$("$1" --help 2>&1) || true; [[ "$h" == *otlp-write-receiver* ]]; }
if [ -x "$OUT" ] && has_otlp "$OUT"; then
  echo "build-prometheus-otlp: cached $OUT ($("$OUT" --version 2>&1 | head -1))"; exit 0
fi

t0=$(date +%s)
mkdir -p "$WORK"/{debs,src}
apt_state() {  # $1 = name, $2.. = suites ; prints apt options
  local d="$WORK/apt-$1"; mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
  : > "$d/sources.list"
  shift; for s in "$@"; do
    echo "deb [signed-by=$KEYRING] $MIRROR $s main" >> "$d/sources.list"
    echo "deb-src [signed-by=$KEYRING] $MIRROR $s main" >> "$d/sources.list"
  done
  echo "-q -oDir::Etc::SourceList=$d/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$d/lists -oDir::Cache=$d/cache -oAPT::Sandbox::User=root -oAcquire::Retries=3 -oAcquire::Languages=none"
}
T=$(apt_state trixie trixie)
C=$(apt_state coll "$COLLECTOR_SUITE")
# shellcheck disable=SC2086
apt-get $T update >/dev/null
# shellcheck disable=SC2086
apt-get $C update >/dev/null

# 1. Debian source of prometheus (orig + debian tarballs)
cd "$WORK/src"
if [ ! -d "prometheus-${PROM_SRC_VERSION%-*}" ]; then
  # shellcheck disable=SC2086
  apt-get $T source --download-only "prometheus=$PROM_SRC_VERSION"
  dir="prometheus-${PROM_SRC_VERSION%-*}"
  mkdir -p "$dir"
  tar -xJf prometheus_"${PROM_SRC_VERSION%-*}".orig.tar.xz -C "$dir" --strip-components=1
  tar -xJf prometheus_"$PROM_SRC_VERSION".debian.tar.xz -C "$dir"
fi
SRC="$WORK/src/prometheus-${PROM_SRC_VERSION%-*}"

# 2. Go toolchain + build-dependency closure (golang-*-dev) from trixie
# shellcheck disable=SC2086
BD=$(apt-cache $T showsrc prometheus | awk -v v="$PROM_SRC_VERSION" '/^Package:/{inv=0} /^Version:/{inv=($2==v)} inv&&/^Build-Depends:/{f=1} inv&&f{print} f&&/^[A-Z]/&&!/^Build-Depends/{exit}' \
     | tr ',' '\n' | sed 's/^ *//; s/Build-Depends: *//; s/ .*//' | grep -E '^golang-.*-dev$' | sort -u)
# shellcheck disable=SC2086
CLOSURE=$(apt-cache $T depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances $BD golang-github-hashicorp-go-version-dev \
     | grep -E '^golang-.*-dev$' | grep -v '^golang-github-golang-protobuf-1-3-dev$' | sort -u)
cd "$WORK/debs"
# shellcheck disable=SC2086
apt-get $T download $CLOSURE golang-1.24-go golang-1.24-src >/dev/null
if [ -n "${COLLECTOR_DEB:-}" ]; then   # pinned local copy (forky is a moving target)
  cp -f "$COLLECTOR_DEB" "$WORK/debs/"
else
  # shellcheck disable=SC2086
  apt-get $C download golang-opentelemetry-collector-dev >/dev/null
fi
echo "build-prometheus-otlp: $(ls "$WORK"/debs/*.deb | wc -l) .debs in $WORK/debs ($(du -sh "$WORK/debs" | cut -f1)), $(( $(date +%s)-t0 ))s"

# 3. unpack into a fresh root + GOPATH (newest version of each package only)
rm -rf "$WORK/root" "$WORK/coll" "$WORK/gopath"; mkdir -p "$WORK/root" "$WORK/coll" "$WORK/gopath"
for p in $CLOSURE golang-1.24-go golang-1.24-src; do
  f=$(ls -v "$WORK"/debs/"${p}"_*.deb | tail -1); dpkg -x "$f" "$WORK/root"
done
dpkg -x "$(ls -v "$WORK"/debs/golang-opentelemetry-collector-dev_*.deb | tail -1)" "$WORK/coll"
cp -al "$WORK/root/usr/share/gocode/src" "$WORK/gopath/src"   # hardlinks: nothing below is modified in place
CS="$WORK/coll/usr/share/gocode/src/go.opentelemetry.io/collector"
GC="$WORK/gopath/src/go.opentelemetry.io/collector"
mkdir -p "$GC/semconv/v1.6.1"
cp -a "$CS/pdata" "$CS/featuregate" "$CS/client" "$GC/"
rm -f "$GC/pdata/pmetric/pmetricotlp/grpc.go"      # needs grpc/mem (grpc >= 1.66); HTTP path unaffected
cat > "$GC/semconv/v1.6.1/semconv.go" <<'EOF'
// Package semconv is a stub with the only constants Prometheus 2.53 uses.
package semconv

const (
	AttributeServiceName       = "service.name"
	AttributeServiceNamespace  = "service.namespace"
	AttributeServiceInstanceID = "service.instance.id"
)
EOF
PKG="$WORK/gopath/src/github.com/prometheus/prometheus"
rm -rf "$PKG"; cp -a "$SRC" "$PKG"
( cd "$PKG"
  while read -r p; do
    case "$p" in ''|'#'*) continue;; 0019-Disable-OTLP-Ingestion-endpoint.patch) echo "skipping $p"; continue;; esac
    patch -p1 -s --no-backup-if-mismatch < "debian/patches/$p"
  done < debian/patches/series
  cp -a debian/vendor ./ )

# 4. build (GOPATH mode, like dh-golang)
# (XDG_CONFIG_HOME: go keeps its telemetry counters there, not in the user's ~/.config)
export GO111MODULE=off GOPATH="$WORK/gopath" GOROOT="$WORK/root/usr/lib/go-1.24" GOCACHE="$WORK/gocache" GOTOOLCHAIN=local GOFLAGS= CGO_ENABLED=0 XDG_CONFIG_HOME="$WORK/xdg"
V=${PROM_SRC_VERSION%-*}
LDF="-s -w -X github.com/prometheus/common/version.Version=$V -X github.com/prometheus/common/version.Revision=$PROM_SRC_VERSION+otlp -X github.com/prometheus/common/version.Branch=debian-otlp -X github.com/prometheus/common/version.BuildUser=build-prometheus-otlp.sh -X github.com/prometheus/common/version.BuildDate=$(date -u +%Y%m%d-%H:%M:%S) -X github.com/prometheus/common/version.GoVersion=go1.24"
tb=$(date +%s)
nice -n "$NICE" "$GOROOT/bin/go" build -trimpath -ldflags "$LDF" -o "$OUT.new" github.com/prometheus/prometheus/cmd/prometheus
mv -f "$OUT.new" "$OUT"
echo "build-prometheus-otlp: go build $(( $(date +%s)-tb ))s, total $(( $(date +%s)-t0 ))s"
"$OUT" --version 2>&1 | head -1
has_otlp "$OUT" && echo "build-prometheus-otlp: OK, supports --enable-feature=otlp-write-receiver"
if [ "${KEEP_WORK:-0}" = 0 ]; then rm -rf "$WORK/root" "$WORK/coll" "$WORK/gopath" "$WORK/gocache" "$WORK/src" "$WORK"/apt-* "$WORK/xdg"; fi
