#!/usr/bin/env bash
# Single-node Apache Kafka broker (KRaft, combined broker+controller) for
# integration tests and local dev. Jars come from Maven Central via mvn
# (deploy/local/kafka-pom.xml) and are cached; no Docker, no tarball download.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

KAFKA_VERSION="${CCM_KAFKA_VERSION:-4.1.2}"
CACHE_DIR="${CCM_CACHE_DIR:-$HOME/.cache/ccm-platform}"
KAFKA_HOME="$CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
LOCAL_DIR="${CCM_LOCAL_DIR:-$REPO_ROOT/.ccm-local}"
STATE="$LOCAL_DIR/kafka"
DATA="$STATE/data"
CONF="$STATE/server.properties"
LOG4J_CONF="$STATE/log4j2.properties"
PIDFILE="$STATE/kafka.pid"
LOGFILE="$STATE/kafka.log"
PORTFILE="$STATE/port"
CPORTFILE="$STATE/controller.port"
START_TIMEOUT="${CCM_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${CCM_KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${CCM_KAFKA_HEAP_OPTS:--Xmx1g -Xms256m}"

usage() {
  cat <<EOF
Usage: $(basename "$0") {start|stop|status|install|kill|reset|logs|--help}

Single-node Apache Kafka $KAFKA_VERSION broker in KRaft mode on 127.0.0.1.

  install  resolve the Kafka jars with mvn into $LIBS (once; cached)
  start    install if needed, start the broker (reusing port and data of an
           earlier start), wait until it accepts connections, then print
             CCM_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<port>
           on stdout. Already running: just prints the line.
  stop     SIGTERM, wait up to ${STOP_TIMEOUT}s, then SIGKILL. OK if not running.
  status   exit 0 if running (prints the line), 3 if not.
  kill     SIGKILL the broker (for failure tests); 'start' recovers the data.
  reset    stop and delete the state dir (data, config, ports).
  logs     print the last 100 lines of the broker log.

Environment:
  CCM_LOCAL_DIR            state root (default <repo>/.ccm-local); this uses \$CCM_LOCAL_DIR/kafka
  CCM_CACHE_DIR            jar cache root (default \$HOME/.cache/ccm-platform)
  CCM_KAFKA_VERSION        Kafka version (default 4.1.2; see README.md)
  CCM_KAFKA_HEAP_OPTS      JVM heap options (default "-Xmx1g -Xms256m")
  CCM_KAFKA_START_TIMEOUT  seconds to wait for the broker (default 120)
  CCM_KAFKA_STOP_TIMEOUT   seconds to wait after SIGTERM (default 30)
State: $STATE
EOF
}

log() { echo "[kafka] $*" >&2; }
die() { echo "[kafka] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- install ---
# shellcheck source=deploy/local/apt-install.sh
source "$SCRIPT_DIR/apt-install.sh"

require_java_and_maven() {
  local missing=()
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  apt_install "${missing[@]}" ||
    die "${missing[*]} missing: apt-get install -y ${missing[*]} (as root)"
}

install_jars() {
  if [[ -f "$LIBS/.complete" ]]; then
    return 0
  fi
  require_java_and_maven
  mkdir -p "$KAFKA_HOME"
  local tmp="$KAFKA_HOME/libs.tmp.$$"
  rm -rf "$tmp"
  log "resolving Kafka $KAFKA_VERSION jars from Maven Central into $LIBS ..."
  local mvnlog="$KAFKA_HOME/mvn.log"
  if ! mvn -B -Dstyle.color=never -f "$SCRIPT_DIR/kafka-pom.xml" \
      -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
    tail -n 40 "$mvnlog" >&2
    rm -rf "$tmp"
    die "mvn failed to resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (full log: $mvnlog)"
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || { rm -rf "$tmp"; die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn"; }
  touch "$tmp/.complete"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  local jars=("$LIBS"/*.jar)
  log "installed ${#jars[@]} jars"
}

# ------------------------------------------------------------------ state ---
read_pid() { if [[ -f "$PIDFILE" ]]; then cat "$PIDFILE" 2>/dev/null || true; fi; }

# running: pid alive AND it is our broker (guards against pid reuse)
is_running() {
  local pid
  pid="$(read_pid)"
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  local cmdline
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *"kafka.Kafka $CONF"* ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# two distinct free loopback ports
pick_ports() {
  python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Kafka Uuid: 16 random bytes, url-safe base64 without padding, not starting with '-'
new_cluster_id() {
  python3 - <<'EOF'
import base64, os
while True:
    s = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break
EOF
}

print_line() { echo "CCM_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$(cat "$PORTFILE")"; }

write_config() {
  local port="$1" cport="$2"
  cat >"$CONF" <<EOF
# generated by deploy/local/kafka.sh on every start; edits are overwritten
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
# events up to 16 MiB (ccm_shared.transport.MAX_MESSAGE_BYTES), as the topics the services create
message.max.bytes=16777216
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# after a SIGKILL the restarted broker waits for its old registration to expire
# (default 9s); shorter for faster failure tests, still tolerant of GC pauses
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=2
log.retention.hours=168
EOF
  cat >"$LOG4J_CONF" <<'EOF'
# generated by deploy/local/kafka.sh; everything goes to stdout -> kafka.log
name = ccm-kafka
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
}

log_tail() {
  echo "----- last 40 lines of $LOGFILE -----" >&2
  tail -n 40 "$LOGFILE" >&2 2>/dev/null || true
  echo "-------------------------------------" >&2
}

# ------------------------------------------------------------------- start ---
do_start() {
  command -v java >/dev/null || require_java_and_maven
  install_jars
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 180 9 || die "could not lock $STATE/.lock"

  if is_running; then
    print_line
    return 0
  fi
  rm -f "$PIDFILE"

  local port cport
  if [[ -s "$PORTFILE" && -s "$CPORTFILE" ]]; then
    port="$(cat "$PORTFILE")"; cport="$(cat "$CPORTFILE")"
  else
    read -r port cport < <(pick_ports)
    echo "$port" >"$PORTFILE"; echo "$cport" >"$CPORTFILE"
    log "picked ports: broker $port, controller $cport"
  fi
  for p in "$port" "$cport"; do
    if port_open "$p"; then
      die "port 127.0.0.1:$p (from $STATE) is in use by another process;" \
          "stop it, or run '$0 reset' to pick new ports (deletes the data)"
    fi
  done

  write_config "$port" "$cport"
  mkdir -p "$DATA"
  if [[ ! -f "$DATA/meta.properties" ]]; then
    local cid
    cid="$(new_cluster_id)"
    log "formatting $DATA (cluster id $cid)"
    java -Xmx256m -Dlog4j2.configurationFile="$LOG4J_CONF" -cp "$LIBS/*" \
      kafka.tools.StorageTool format -t "$cid" -c "$CONF" --ignore-formatted >>"$LOGFILE" 2>&1 \
      || { log_tail; die "kafka storage format failed"; }
  fi

  local offset=0
  [[ -f "$LOGFILE" ]] && offset="$(stat -c %s "$LOGFILE")"
  echo "===== $(date -Is) starting Kafka $KAFKA_VERSION on 127.0.0.1:$port =====" >>"$LOGFILE"
  log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$port (controller $cport, data $DATA)"

  # setsid: own session, so the broker survives the shell/job that started it
  # shellcheck disable=SC2086
  setsid java $HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONF" -Dkafka.logs.dir="$STATE" \
    ${CCM_KAFKA_JVM_OPTS:-} \
    -cp "$LIBS/*" kafka.Kafka "$CONF" </dev/null >>"$LOGFILE" 2>&1 9>&- &
  local pid=$!
  echo "$pid" >"$PIDFILE"

  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      log_tail
      die "Kafka exited during startup (log: $LOGFILE)"
    fi
    # (process substitution, not a pipe: grep -q exiting early would SIGPIPE
    #  tail and make the pipeline fail under pipefail)
    if port_open "$port" &&
       grep -qE 'Kafka Server started|\] started \(kafka\.server\.' < <(tail -c +"$((offset + 1))" "$LOGFILE"); then
      break
    fi
    if (( SECONDS >= deadline )); then
      log_tail
      log "Kafka did not start within ${START_TIMEOUT}s; stopping pid $pid"
      do_stop
      die "Kafka did not start within ${START_TIMEOUT}s (log: $LOGFILE; raise CCM_KAFKA_START_TIMEOUT?)"
    fi
    sleep 0.2
  done
  log "Kafka is up (pid $pid) on 127.0.0.1:$port"
  print_line
}

# -------------------------------------------------------------------- stop ---
do_stop() {
  if ! is_running; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  local pid
  pid="$(read_pid)"
  log "stopping Kafka (pid $pid) ..."
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      log "still running after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f "$PIDFILE"
  log "stopped"
}

do_kill() {
  if ! is_running; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  local pid
  pid="$(read_pid)"
  log "SIGKILL Kafka (pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$PIDFILE"
}

do_status() {
  if is_running; then
    print_line
    return 0
  fi
  log "not running"
  return 3
}

case "${1:-}" in
  start)   do_start ;;
  stop)    do_stop ;;
  status)  do_status ;;
  install) install_jars; log "jars in $LIBS" ;;
  kill)    do_kill ;;
  reset)   do_stop; rm -rf "$STATE"; log "removed $STATE" ;;
  logs)    tail -n 100 "$LOGFILE" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
