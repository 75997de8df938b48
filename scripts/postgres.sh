#!/usr/bin/env bash
# PostgreSQL from the Debian package: install if missing, start the cluster, create the `shop`
# role (password auth over loopback, CREATEDB so tests can make a database each) and database.
# Reuses any server that already accepts $DATABASE_URL.
SERVICE=postgres
source "$(dirname "$0")/lib.sh"

up() {
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

down() {
  local version name
  while read -r version name _; do
    pg_ctlcluster --skip-systemctl-redirect "$version" "$name" stop 2>/dev/null || true
  done < <(pg_lsclusters --no-header 2>/dev/null)
  log "stopped"
}

"${1:-up}"
