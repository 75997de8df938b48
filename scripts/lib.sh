# shellcheck shell=bash
# Shared helpers for the service scripts: paths, logging, port probes, waiting.
# Sourced, never run. Every service script is idempotent: it reuses a service that already
# answers on its address and only installs/starts what is missing.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
mkdir -p "$LOCAL/logs"

# Defaults shared with the Rust config (platform::config). Override through the environment.
export DATABASE_URL="${DATABASE_URL:-postgres://shop:shop@127.0.0.1:5432/shop}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
# The same brokers' TLS listeners (docs/operations.md, TLS), with Debian's self-signed
# `snakeoil` certificate for `localhost`; tests/it/services.rs runs the product over them.
export KAFKA_TLS_BROKERS="${KAFKA_TLS_BROKERS:-localhost:9094}"
export AMQP_TLS_URL="${AMQP_TLS_URL:-amqps://guest:guest@localhost:5671/%2f}"
# The SMTP server the email group sends through (scripts/smtp.sh: OpenSMTPD, every message
# into one Maildir).
export SMTP_URL="${SMTP_URL:-smtp://127.0.0.1:2525}"
export SMTP_MAILDIR="${SMTP_MAILDIR:-$LOCAL/smtp/mail}"
DEV_TLS_CERT=/etc/ssl/certs/ssl-cert-snakeoil.pem
DEV_TLS_KEY=/etc/ssl/private/ssl-cert-snakeoil.key

# Development key material (docs/security.md: one `kid=secret` per line, outside the
# database, the first key signing): made once per checkout, readable by its owner only.
# Set JWT_KEYS / JWT_KEYS_FILE, AUDIT_KEYS / AUDIT_KEYS_FILE or MASTER_KEYS / MASTER_KEYS_FILE
# yourself to use other keys.
dev_keys() {
  local file="$LOCAL/keys/$1.keys"
  if [[ ! -s "$file" ]]; then
    mkdir -p "$LOCAL/keys" && chmod 700 "$LOCAL/keys"
    # The name carries a random tag: a database that outlived its checkout (scripts/postgres.sh,
    # bind_dev_database) must never meet another secret under the same name.
    (umask 077 && printf '%s-%s-%s=%s\n' "$1" "$(date -u +%Y%m%d)" "$(od -An -tx1 -N3 /dev/urandom | tr -d ' \n')" \
      "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$file")
  fi
  echo "$file"
}
if [[ -z "${JWT_KEYS:-}" && -z "${JWT_KEYS_FILE:-}" ]]; then
  JWT_KEYS_FILE="$(dev_keys jwt)"
  export JWT_KEYS_FILE
fi
if [[ -z "${AUDIT_KEYS:-}" && -z "${AUDIT_KEYS_FILE:-}" ]]; then
  AUDIT_KEYS_FILE="$(dev_keys audit)"
  export AUDIT_KEYS_FILE
fi
# The master key wraps customers' data keys (docs/security.md, Erasure): losing it loses every
# customer's sealed personal data, so outside development keep it like a database backup key.
if [[ -z "${MASTER_KEYS:-}" && -z "${MASTER_KEYS_FILE:-}" ]]; then
  MASTER_KEYS_FILE="$(dev_keys master)"
  export MASTER_KEYS_FILE
fi

log() { printf '\033[1m[%s]\033[0m %s\n' "${SERVICE:-shop}" "$*" >&2; }
die() { printf '\033[31m[%s] error:\033[0m %s\n' "${SERVICE:-shop}" "$*" >&2; exit 1; }

# port_open HOST PORT -> 0 when something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND... : polls COMMAND every half second.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then return 1; fi
    sleep 0.5
  done
  log "$what is up"
}

apt_updated=""
apt_install() {
  if [[ -z "$apt_updated" ]]; then
    log "apt-get update"
    apt-get update -qq >"$LOCAL/logs/apt.log" 2>&1 || die "apt-get update failed, see $LOCAL/logs/apt.log"
    apt_updated=1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$LOCAL/logs/apt.log" 2>&1 \
    || die "apt-get install $* failed, see $LOCAL/logs/apt.log"
}

# Makes sure the development TLS certificate exists (the ssl-cert package generates it).
dev_tls() {
  [[ -s "$DEV_TLS_CERT" && -s "$DEV_TLS_KEY" ]] || apt_install ssl-cert
  [[ -s "$DEV_TLS_CERT" ]] || make-ssl-cert generate-default-snakeoil --force-overwrite
}

# host and port out of a URL like scheme://user:pass@host:port/path
url_host() { local r=${1#*://}; r=${r#*@}; r=${r%%/*}; echo "${r%%:*}"; }
url_port() { local r=${1#*://}; r=${r#*@}; r=${r%%/*}; [[ $r == *:* ]] && echo "${r##*:}" || echo "$2"; }
