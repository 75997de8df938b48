#!/usr/bin/env bash
# RabbitMQ from the Debian package. There is no init system here, so the package's own start
# fails at install time; we start the node detached and wait for it. guest/guest works from
# loopback only, which is all we use. Reuses any broker already listening on $AMQP_URL (and,
# for TLS, on $AMQP_TLS_URL: a local node without its TLS listener is restarted with it).
SERVICE=rabbitmq
source "$(dirname "$0")/lib.sh"

up() {
  local host port tls_port
  host=$(url_host "$AMQP_URL"); port=$(url_port "$AMQP_URL" 5672)
  tls_port=$(url_port "$AMQP_TLS_URL" 5671)
  if port_open "$host" "$port" && { port_open 127.0.0.1 "$tls_port" || ! command -v rabbitmqctl >/dev/null; }; then
    log "reusing the broker at $host:$port"
    return
  fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  # The node must only listen on loopback.
  local conf=/etc/rabbitmq/rabbitmq.conf
  if ! grep -q '^listeners.tcp.default' "$conf" 2>/dev/null; then
    printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users.guest = true\n' "$port" >>"$conf"
  fi
  # A TLS listener too, with the development certificate (copied where the node's own user
  # can read it).
  dev_tls
  mkdir -p /etc/rabbitmq/tls
  install -m 644 "$DEV_TLS_CERT" /etc/rabbitmq/tls/server.pem
  install -m 600 "$DEV_TLS_KEY" /etc/rabbitmq/tls/server.key
  chown rabbitmq: /etc/rabbitmq/tls/server.key 2>/dev/null || true
  if ! grep -q '^listeners.ssl.default' "$conf"; then
    printf '%s\n' "listeners.ssl.default = 127.0.0.1:$tls_port" \
      'ssl_options.certfile = /etc/rabbitmq/tls/server.pem' \
      'ssl_options.keyfile = /etc/rabbitmq/tls/server.key' \
      'ssl_options.verify = verify_none' \
      'ssl_options.fail_if_no_peer_cert = false' >>"$conf"
    if rabbitmqctl -q status >/dev/null 2>&1; then
      log "restarting rabbitmq-server to open its TLS listener"
      rabbitmqctl -q stop >/dev/null 2>&1 || true
    fi
  fi
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    log "starting rabbitmq-server"
    rabbitmq-server -detached >>"$LOCAL/logs/rabbitmq.log" 2>&1 || die "rabbitmq-server failed to start, see $LOCAL/logs/rabbitmq.log and /var/log/rabbitmq/"
  fi
  # await_startup fails at once while the detached node has not registered yet: poll it.
  wait_for 120 "rabbitmq node" rabbitmqctl -q await_startup --timeout 5 \
    || die "rabbitmq did not finish starting; see /var/log/rabbitmq/ and $LOCAL/logs/rabbitmq.log"
  wait_for 60 "rabbitmq" port_open "$host" "$port" || die "rabbitmq is running but not listening on $host:$port"
  wait_for 30 "rabbitmq (TLS)" port_open 127.0.0.1 "$tls_port" || die "rabbitmq is running but its TLS listener is not on 127.0.0.1:$tls_port; see /var/log/rabbitmq/"
}

down() {
  if rabbitmqctl -q status >/dev/null 2>&1; then rabbitmqctl -q stop >/dev/null 2>&1 || true; fi
  log "stopped"
}

"${1:-up}"
