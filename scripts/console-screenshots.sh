#!/usr/bin/env bash
# Regenerates the operator console's screenshots in docs/console/ (shown in
# docs/operations.md): runs the console's browser test against the real services with
# CONSOLE_SCREENSHOTS set, so every picture is of a real page in a real (headless) Chromium.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/deps.sh"
bash "$here/services.sh" up
source "$here/lib.sh"
SERVICE=screenshots
cd "$ROOT"
cargo run --quiet -p shop -- setup
CONSOLE_SCREENSHOTS="$ROOT/docs/console" cargo test -q -p shop --test it console:: -- --test-threads=1
log "screenshots written to docs/console/"
ls -1 "$ROOT/docs/console"
