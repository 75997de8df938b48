#!/usr/bin/env bash
# Starts the whole system on this machine: build prerequisites, the services (installed and
# started if missing, reused if running), migrations and topics, the development stock seed,
# then every role of `shop` in one process (release build) until Ctrl-C. Stop the services
# afterwards with scripts/stop.sh.
#
#   scripts/run.sh [ARGS...]      runs `shop run ARGS...` in the foreground
#   scripts/run.sh --check        the same up to readiness (/readyz on OPS_ADDR answers 200),
#                                 then SIGTERM; exits 0 only if it got ready and stopped cleanly
#
# SHOP_BUILD_PROFILE=dev builds the same binary in the dev profile instead of release (CI does,
# so the check shares its compiled dependencies with the test build that follows).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
check=""
if [[ "${1:-}" == "--check" ]]; then check=1; shift; fi
bash "$here/deps.sh"
bash "$here/services.sh" up
# Paths, and the development bearer-token keys (.local/keys/jwt.keys, made on first use).
source "$here/lib.sh"
# Development conveniences, off by default in `shop run`: the query console on GET /graphql.
export GRAPHQL_CONSOLE="${GRAPHQL_CONSOLE:-true}"
# Signed audit checkpoints, outside the database (docs/security.md).
export AUDIT_CHECKPOINT_DIR="${AUDIT_CHECKPOINT_DIR:-$LOCAL/audit-checkpoints}"
cd "$here/.."
profile=(--release)
[[ "${SHOP_BUILD_PROFILE:-release}" == dev ]] && profile=()
cargo run "${profile[@]}" -q -p shop -- setup
# Development seed: the catalog's products and prices (checkouts carry no prices) and their
# stock in the stand-in inventory; existing products and stock are kept.
cargo run "${profile[@]}" -q -p shop -- catalog seed --why "development seed (scripts/run.sh)"
cargo run "${profile[@]}" -q -p shop -- inventory seed --why "development seed (scripts/run.sh)"
if [[ -z "$check" ]]; then
  log "bearer-token keys: $JWT_KEYS_FILE; mint a token with"
  log "  JWT_KEYS_FILE=$JWT_KEYS_FILE cargo run -q -p shop -- token --role customer --customer-id alice"
  exec cargo run "${profile[@]}" -p shop -- run "$@"
fi

SERVICE=run-check
ops="${OPS_ADDR:-127.0.0.1:9090}"
out="$LOCAL/logs/run-check.log"
cargo run "${profile[@]}" -q -p shop -- run "$@" >"$out" 2>&1 &
pid=$!
deadline=$((SECONDS + 180))
until curl -sf "http://$ops/readyz" >/dev/null 2>&1; do
  if ! kill -0 "$pid" 2>/dev/null; then
    tail -n 30 "$out" >&2
    die "shop run exited before it was ready (log: $out)"
  fi
  if ((SECONDS >= deadline)); then
    kill -KILL "$pid" 2>/dev/null || true
    tail -n 30 "$out" >&2
    die "shop run was not ready within 180 s (log: $out)"
  fi
  sleep 0.5
done
log "ready: $(curl -s "http://$ops/readyz" | head -c 300)"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
((status == 0)) || { tail -n 30 "$out" >&2; die "shop run exited with status $status after SIGTERM (log: $out)"; }
log "stopped cleanly after SIGTERM"
