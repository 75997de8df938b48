#!/usr/bin/env bash
# A flame graph of one `shop-bench append` phase, the whole machine sampled (the bench's
# client and server threads and the PostgreSQL backends), as an SVG.
#
#   bash scripts/flamegraph.sh single 64 docs/flamegraphs/append-single-64.svg
#
# Needs the services up (scripts/services.sh up) and perf (linux-perf); installs inferno
# (cargo install) to fold and draw. Builds the bench with line tables (profile `profiling`).
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:?phase: peer, plain, single, group or http}
clients=${2:-64}
out=${3:-docs/flamegraphs/append-$phase-$clients.svg}
seconds=${SECONDS_SAMPLED:-10}

source scripts/lib.sh
command -v perf >/dev/null || apt-get install -y -q linux-perf >/dev/null
command -v inferno-flamegraph >/dev/null || cargo install -q --locked inferno
cargo build -q --profile profiling -p bench

data=$(mktemp /tmp/perf.XXXXXX)
log=$(mktemp /tmp/bench.XXXXXX)
RUST_LOG=error ./target/profiling/shop-bench append --phases "$phase" --clients "$clients" \
    --requests 1000000 > "$log" 2>&1 &
bench=$!
# The bench is stopped mid-phase: its scratch database (named on its first line) goes too.
cleanup() {
    kill "$bench" 2>/dev/null || true
    wait "$bench" 2>/dev/null || true
    db=$(grep -o 'shopbench_[0-9a-f]*' "$log" | head -1 || true)
    # An autovacuum worker may still hold it for a while (FORCE cannot end it for us).
    for _ in $(seq 30); do
        [ -z "$db" ] && break
        psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" 2>/dev/null && break
        sleep 2
    done
    rm -f "$data" "$data.folded" "$log"
}
trap cleanup EXIT
sleep 12   # scratch database, migrations, warm-up
perf record -q -o "$data" -a -F 99 --call-graph dwarf,16384 -- sleep "$seconds" 2>/dev/null
perf script -i "$data" 2>/dev/null | inferno-collapse-perf --all > "$data.folded"
[ -n "${KEEP_FOLDED:-}" ] && cp "$data.folded" "$KEEP_FOLDED"
mkdir -p "$(dirname "$out")"
inferno-flamegraph --minwidth 0.2 --title "shop-bench append --phases $phase --clients $clients (whole machine)" \
    < "$data.folded" > "$out"
echo "wrote $out"
