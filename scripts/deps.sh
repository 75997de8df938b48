#!/usr/bin/env bash
# Build prerequisites of the Rust workspace that do not come from crates.io:
# - cmake and a C toolchain: rdkafka builds librdkafka from source (feature cmake-build).
# - curl's headers: librdkafka 2.12 includes <curl/curl.h> even when built without curl
#   (an #ifdef on a 0/1 macro in rdkafka_conf.c); only the header is used, nothing links it.
# - psql: the service scripts use it to probe and set up PostgreSQL.
# - OpenSSL's headers and pkg-config: librdkafka's TLS (feature ssl) builds against them.
# - curl: `scripts/run.sh --check` polls /readyz with it.
# - chromium and chromium-driver: the operator console's tests drive a real headless browser
#   over WebDriver (tests/src/browser.rs); scripts/console-screenshots.sh uses them too.
SERVICE=deps
source "$(dirname "$0")/lib.sh"

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(build-essential)
[[ -f /usr/include/curl/curl.h || -f /usr/include/x86_64-linux-gnu/curl/curl.h ]] || missing+=(libcurl4-openssl-dev)
command -v psql >/dev/null || missing+=(postgresql-client)
# TLS to Kafka: librdkafka links the system OpenSSL.
[[ -f /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v curl >/dev/null || missing+=(curl)
command -v chromium >/dev/null || missing+=(chromium)
[[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) first"
