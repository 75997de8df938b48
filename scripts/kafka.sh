#!/usr/bin/env bash
# Apache Kafka, single node in KRaft mode (combined broker + controller), run from its Maven
# Central artifacts on the machine's JDK. The version is pinned in scripts/kafka/pom.xml; the
# jars are resolved into .local/kafka/lib with a Maven repository under .local/m2, so nothing
# outside the repo is cached. Storage is formatted once; the broker runs with a small heap.
# Reuses any broker already listening at $KAFKA_BROKERS. Besides plaintext on $KAFKA_BROKERS,
# it listens for TLS on $KAFKA_TLS_BROKERS (Debian's snakeoil certificate for localhost).
SERVICE=kafka
source "$(dirname "$0")/lib.sh"

KDIR="$LOCAL/kafka"
LIB="$KDIR/lib"
CONF="$KDIR/server.properties"
PIDFILE="$KDIR/kafka.pid"
LOG="$LOCAL/logs/kafka.log"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
TLS_PORT="${KAFKA_TLS_BROKERS##*:}"
HEAP="${KAFKA_HEAP:--Xmx768m -Xms256m}"

resolve_jars() {
  local pom="$ROOT/scripts/kafka/pom.xml" stamp="$LIB/.pom.sha"
  local sum; sum=$(sha256sum "$pom" | cut -d' ' -f1)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$sum" ]]; then return; fi
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  log "resolving the broker's jars with Maven (first run only)"
  rm -rf "$LIB"; mkdir -p "$LIB"
  mvn -q -B -f "$pom" -Dmaven.repo.local="$LOCAL/m2" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$LIB" >"$LOCAL/logs/kafka-mvn.log" 2>&1 \
    || die "Maven could not resolve Kafka's jars, see $LOCAL/logs/kafka-mvn.log"
  echo "$sum" >"$stamp"
}

write_config() {
  local port=$1
  mkdir -p "$KDIR/data" "$KDIR/tls"
  # The TLS listener's key and certificate, in one PEM file (Kafka's PEM key store).
  dev_tls
  (umask 077 && cat "$DEV_TLS_KEY" "$DEV_TLS_CERT" >"$KDIR/tls/server.pem")
  cat >"$CONF" <<PROPS
# Written by scripts/kafka.sh: a single combined node for local development and tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$port,SSL://127.0.0.1:$TLS_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SSL://localhost:$TLS_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SSL:SSL,CONTROLLER:PLAINTEXT
ssl.keystore.type=PEM
ssl.keystore.location=$KDIR/tls/server.pem
log.dirs=$KDIR/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
num.io.threads=2
num.network.threads=2
num.recovery.threads.per.data.dir=1
PROPS
  cat >"$KDIR/log4j2.properties" <<PROPS
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.console.ref = console
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
PROPS
}

java_run() {
  # shellcheck disable=SC2086
  java $HEAP -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KDIR/log4j2.properties" -cp "$LIB/*" "$@"
}

running_pid() {
  [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"
}

up() {
  local host port
  host=${KAFKA_BROKERS%%,*}; port=${host##*:}; host=${host%%:*}
  # A broker left stopped (SIGSTOP by an interrupted fault test) still accepts TCP
  # connections in the kernel: wake it first.
  if [[ -n "$(running_pid)" ]]; then kill -CONT "$(running_pid)" 2>/dev/null || true; fi
  if port_open "$host" "$port"; then
    if [[ -n "$(running_pid)" ]] && ! port_open 127.0.0.1 "$TLS_PORT"; then
      log "restarting the broker to open its TLS listener"
      down
    else
      log "reusing the broker at $host:$port"
      return
    fi
  fi
  [[ "$host" == 127.0.0.1 || "$host" == localhost ]] || die "KAFKA_BROKERS=$KAFKA_BROKERS is not reachable and is not local"
  if port_open 127.0.0.1 "$CONTROLLER_PORT" && [[ -z "$(running_pid)" ]]; then
    die "controller port $CONTROLLER_PORT is taken by another process; set KAFKA_CONTROLLER_PORT"
  fi
  resolve_jars
  write_config "$port"
  if [[ ! -f "$KDIR/data/meta.properties" ]]; then
    local id; id=$(java_run kafka.tools.StorageTool random-uuid 2>>"$LOG" | tail -1)
    log "formatting storage (cluster id $id)"
    java_run kafka.tools.StorageTool format -t "$id" -c "$CONF" >>"$LOG" 2>&1 \
      || die "formatting Kafka storage failed, see $LOG"
  fi
  local from=0
  [[ -f "$LOG" ]] && from=$(wc -l <"$LOG")
  if [[ -z "$(running_pid)" ]]; then
    log "starting the broker (logs: $LOG)"
    # setsid: the broker must outlive this script and the shell that ran it.
    setsid bash -c "exec java $HEAP -XX:+UseG1GC -Djava.awt.headless=true \
      -Dlog4j2.configurationFile='$KDIR/log4j2.properties' -cp '$LIB/*' kafka.Kafka '$CONF'" \
      >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
  fi
  local deadline=$((SECONDS + 120))
  # Started means started this time: the log also holds earlier starts.
  until port_open 127.0.0.1 "$port" && tail -n "+$((from + 1))" "$LOG" | grep -q 'Kafka Server started'; do
    [[ -n "$(running_pid)" ]] || die "the broker exited during start-up; last lines of $LOG:
$(tail -n 20 "$LOG")"
    (( SECONDS < deadline )) || die "the broker did not start within 120 s, see $LOG"
    sleep 0.5
  done
  log "kafka is up on 127.0.0.1:$port"
}

down() {
  local pid; pid=$(running_pid || true)
  if [[ -n "$pid" ]]; then
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  log "stopped"
}

"${1:-up}"
