#!/usr/bin/env bash
# Brings all local services up (or down): PostgreSQL, RabbitMQ, Kafka, SMTP. Idempotent; services
# already reachable through DATABASE_URL / AMQP_URL / KAFKA_BROKERS are reused.
#   scripts/services.sh up|down|status
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"

case "${1:-up}" in
  up)
    bash "$here/postgres.sh" up
    bash "$here/rabbitmq.sh" up
    bash "$here/kafka.sh" up
    bash "$here/smtp.sh" up
    ;;
  down)
    bash "$here/smtp.sh" down
    bash "$here/kafka.sh" down
    bash "$here/rabbitmq.sh" down
    bash "$here/postgres.sh" down
    ;;
  status)
    SERVICE=status
    psql "$DATABASE_URL" -Atqc 'select 1' >/dev/null 2>&1 && log "postgres: up ($DATABASE_URL)" || log "postgres: down"
    port_open "$(url_host "$AMQP_URL")" "$(url_port "$AMQP_URL" 5672)" && log "rabbitmq: up ($AMQP_URL)" || log "rabbitmq: down"
    b=${KAFKA_BROKERS%%,*}
    port_open "${b%%:*}" "${b##*:}" && log "kafka: up ($KAFKA_BROKERS)" || log "kafka: down"
    port_open "$(url_host "$SMTP_URL")" "$(url_port "$SMTP_URL" 2525)" && log "smtp: up ($SMTP_URL)" || log "smtp: down"
    ;;
  *) die "usage: scripts/services.sh up|down|status" ;;
esac
