#!/usr/bin/env bash
# PostgreSQL from the Debian package: install if missing, start the cluster, create the `shop`
# role (password auth over loopback, CREATEDB so tests can make a database each) and database.
# Reuses any server that already accepts $DATABASE_URL.
SERVICE=postgres
source "$(dirname "$0")/lib.sh"

up() {
  server_up
  bind_dev_database
}

server_up() {
  if psql "$DATABASE_URL" -Atqc 'select 1' >/dev/null 2>&1; then
    log "reusing the server at $(url_host "$DATABASE_URL"):$(url_port "$DATABASE_URL" 5432)"
    return
  fi
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  local cluster version name port
  cluster=$(pg_lsclusters --no-header | head -1)
  [[ -n "$cluster" ]] || die "no PostgreSQL cluster found (pg_lsclusters is empty); try: pg_createcluster 15 main"
  read -r version name port _ <<<"$cluster"
  local want_port; want_port=$(url_port "$DATABASE_URL" 5432)
  [[ "$port" == "$want_port" ]] || die "cluster $version/$name listens on $port but DATABASE_URL wants $want_port"
  if ! pg_lsclusters --no-header | awk -v v="$version" -v n="$name" '$1==v && $2==n {print $4}' | grep -q online; then
    if port_open 127.0.0.1 "$port"; then
      die "port $port is taken by something that does not accept DATABASE_URL ($DATABASE_URL)"
    fi
    # Parallel tests each open a small pool; Debian's default of 100 connections is tight.
    local conf="/etc/postgresql/$version/$name/conf.d/shop.conf"
    if [[ ! -f "$conf" ]]; then
      printf "max_connections = 300\nlisten_addresses = '127.0.0.1'\n" >"$conf"
    fi
    log "starting cluster $version/$name"
    pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start \
      || die "pg_ctlcluster failed; see /var/log/postgresql/postgresql-$version-$name.log"
  fi
  wait_for 60 "postgres" pg_isready -q -h 127.0.0.1 -p "$port" || die "postgres did not come up on port $port"
  local user pass db r
  r=${DATABASE_URL#*://}; user=${r%%:*}; r=${r#*:}; pass=${r%%@*}; db=${DATABASE_URL##*/}; db=${db%%\?*}
  log "ensuring role $user and database $db"
  su postgres -c "psql -q -p $port" >/dev/null <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN
    CREATE ROLE "$user" LOGIN CREATEDB PASSWORD '$pass';
  ELSE
    ALTER ROLE "$user" LOGIN CREATEDB PASSWORD '$pass';
  END IF;
END \$\$;
SQL
  if [[ -z "$(su postgres -c "psql -p $port -Atqc \"select 1 from pg_database where datname = '$db'\"")" ]]; then
    su postgres -c "createdb -p $port -O '$user' '$db'"
  fi
  psql "$DATABASE_URL" -Atqc 'select 1' >/dev/null || die "still cannot connect with $DATABASE_URL"
}

# The development database outlives a checkout (the cluster is the machine's) while the
# development keys that sealed its customers' data and keyed its audit chain live in the
# checkout's .local/keys (scripts/lib.sh). A new checkout, or a removed .local, would meet data
# it cannot open, and `shop run` refuses to start (docs/security.md, Erasure). So, with the
# development keys only, the database is marked with their fingerprint; a database marked for
# other keys, or unmarked and holding data sealed or signed under keys this checkout lacks, is
# recreated empty, and says so. Keys set through the environment turn this off.
bind_dev_database() {
  [[ -z "${MASTER_KEYS:-}" && "${MASTER_KEYS_FILE:-}" == "$LOCAL/keys/master.keys" ]] || return 0
  [[ -z "${AUDIT_KEYS:-}" && "${AUDIT_KEYS_FILE:-}" == "$LOCAL/keys/audit.keys" ]] || return 0
  local base query db admin mark current
  base=${DATABASE_URL%%\?*}; query=${DATABASE_URL#"$base"}; db=${base##*/}; admin="${base%/*}/postgres$query"
  mark="shop-dev-keys:$(cat "$MASTER_KEYS_FILE" "$AUDIT_KEYS_FILE" | sha256sum | cut -c1-32)"
  current=$(psql "$DATABASE_URL" -Atqc "select shobj_description(oid, 'pg_database') from pg_database where datname = current_database()")
  [[ "$current" == "$mark" ]] && return 0
  if [[ -z "$current" && -z "$(foreign_kids)" ]]; then
    log "database $db now belongs to this checkout's development keys"
  else
    log "database $db holds data sealed or signed with development keys this checkout does not have (another checkout's, or a removed .local/keys): recreating it empty"
    psql "$admin" -qc "DROP DATABASE \"$db\" WITH (FORCE)" >/dev/null || die "could not drop database $db"
    psql "$admin" -qc "CREATE DATABASE \"$db\"" >/dev/null || die "could not create database $db"
  fi
  psql "$DATABASE_URL" -qc "COMMENT ON DATABASE \"$db\" IS '$mark'" >/dev/null || die "could not mark database $db"
}

# The master and audit key names the database uses that this checkout's key files lack.
foreign_kids() {
  local table column file kid
  for spec in "customer_keys master_kid $MASTER_KEYS_FILE" "events hash_kid $AUDIT_KEYS_FILE"; do
    read -r table column file <<<"$spec"
    [[ "$(psql "$DATABASE_URL" -Atqc "select to_regclass('public.$table') is not null")" == t ]] || continue
    while read -r kid; do
      [[ -z "$kid" ]] || cut -d= -f1 "$file" | grep -qxF -- "$kid" || echo "$kid"
    done < <(psql "$DATABASE_URL" -Atqc "select distinct $column from $table where $column is not null")
  done
}

down() {
  local version name
  while read -r version name _; do
    pg_ctlcluster --skip-systemctl-redirect "$version" "$name" stop 2>/dev/null || true
  done < <(pg_lsclusters --no-header 2>/dev/null)
  log "stopped"
}

"${1:-up}"
