#!/usr/bin/env bash
# Supply-chain checks (deny.toml): licences, banned crates and sources always; security
# advisories when the RustSec database can be fetched (it lives on github.com, which some
# machines, this project's CI among them, cannot reach: the run says so instead of passing
# silently). Installs the pinned cargo-deny when missing.
SERVICE=deny
source "$(dirname "$0")/lib.sh"
version=0.20.2
if [[ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $version" ]]; then
  log "installing cargo-deny $version"
  cargo install --locked --quiet cargo-deny --version "$version"
fi
cd "$ROOT"
cargo deny --log-level error check bans licenses sources
if cargo deny --log-level off fetch db >/dev/null 2>&1; then
  cargo deny --log-level error check advisories
else
  log "SKIPPED advisories: the RustSec advisory database (github.com/RustSec/advisory-db) is unreachable from this machine; bans in deny.toml keep the known advisory's crate (rsa) out"
fi
