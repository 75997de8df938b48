#!/usr/bin/env bash
# Starts the whole system on this machine: build prerequisites, the services (installed and
# started if missing, reused if running), migrations and topics, the development stock seed,
# then every role of `shop` in one process (release build) until Ctrl-C. Stop the services
# afterwards with scripts/stop.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/deps.sh"
bash "$here/services.sh" up
cd "$here/.."
cargo run --release -q -p shop -- setup
# Development seed: a small stocked catalog for the stand-in inventory (existing stock is kept).
cargo run --release -q -p shop -- inventory seed
exec cargo run --release -p shop -- run "$@"
