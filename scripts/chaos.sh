#!/usr/bin/env bash
# The long fault-injection run: the chaos tests (tests/faults/chaos.rs) with more orders and
# repeated rounds, against the real services, then a table of faults, orders, invariant
# results and how long each run took to settle. CI runs the short version (240 orders, one
# round) as part of scripts/test.sh.
#
#   scripts/chaos.sh [ROUNDS] [ORDERS]     defaults: 3 rounds of 2000 orders per fault
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rounds="${1:-3}"
orders="${2:-2000}"
bash "$here/deps.sh"
bash "$here/services.sh" up
source "$here/lib.sh"
SERVICE=chaos
cd "$ROOT"
out="$LOCAL/logs/chaos.log"
: >"$out"
status=0
for round in $(seq 1 "$rounds"); do
  log "round $round of $rounds ($orders orders per fault)"
  set +e
  CHAOS_ORDERS="$orders" cargo test -p shop --test faults chaos -- --nocapture --test-threads=1 2>&1 \
    | grep -v '^{' | tee -a "$out" | grep -E "^test |chaos:"
  ((PIPESTATUS[0] == 0)) || status=1
  set -e
done
echo
printf '%-22s %7s %10s %10s %12s %s\n' fault orders confirmed cancelled violations "settled after"
grep -o 'chaos: .*' "$out" | sed 's/^chaos: //' | while IFS='|' read -r fault n conf canc viol took; do
  printf '%-22s %7s %10s %10s %12s %s\n' "$fault" "$n" "$conf" "$canc" "$viol" "$took"
done
# cargo's own per-round totals (test names and results interleave with --nocapture output).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$out"
exit "$status"
