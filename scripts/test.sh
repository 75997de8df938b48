#!/usr/bin/env bash
# The whole test suite, from a fresh machine: build prerequisites, the real services
# (installed and started if missing, reused if running), migrations and topics, then every
# test of the workspace. Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/deps.sh"
bash "$here/services.sh" up
source "$here/lib.sh"
SERVICE=test

# Databases left by an interrupted earlier run (tests drop their own when they finish).
stale=$(psql "$DATABASE_URL" -Atqc "select datname from pg_database where datname like 'shoptest\_%'")
for db in $stale; do psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null; done

cd "$ROOT"
# Queues left the same way (tests/src/bin/drop-test-queues.rs): a broker piling up hundreds of
# quorum queues run after run slows down until declarations time out.
if command -v rabbitmqctl >/dev/null; then
  timeout 120 rabbitmqctl list_queues --quiet --no-table-headers name 2>/dev/null \
    | cargo run --quiet -p shop-tests --bin drop-test-queues \
    || log "could not clean up stale test queues (continuing)"
fi
cargo run --quiet -p shop -- setup
log="$LOCAL/logs/test.log"
set +e
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
