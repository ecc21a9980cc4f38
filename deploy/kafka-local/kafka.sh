#!/usr/bin/env bash
# A one-node KRaft Apache Kafka (combined broker+controller) on 127.0.0.1, run straight from the
# Maven Central jars of org.apache.kafka:kafka_2.13 — no Docker, no tarball download.
#
#   deploy/kafka-local/kafka.sh start | stop | restart [--kill] | status | logs [-f|N] | fetch | env
#
# See README.md beside this file for the environment variables.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
POM="$SCRIPT_DIR/pom.xml"
POM_KAFKA_VERSION=$(sed -n 's:.*<kafka\.version>\([^<]*\)</kafka\.version>.*:\1:p' "$POM" | head -n 1)

KAFKA_VERSION=${KAFKA_VERSION:-$POM_KAFKA_VERSION}
CACHE_DIR=${KAFKA_CACHE_DIR:-${HOME:-$(cd ~ && pwd)}/.cache/kchat/kafka/$KAFKA_VERSION}
LIBS="$CACHE_DIR/libs"
DATA_DIR=${KAFKA_DATA_DIR:-/tmp/kchat-kafka}
HOST=127.0.0.1
PORT=${KAFKA_PORT:-9092}
CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}
HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}
# The GC settings of Kafka's own kafka-run-class.sh, plus die-on-OOM so a broken broker is visible.
JVM_OPTS=${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}
LOG_LEVEL=${KAFKA_LOG_LEVEL:-INFO}

PID_FILE="$DATA_DIR/kafka.pid"
LOG_FILE="$DATA_DIR/kafka.log"
PROPS="$DATA_DIR/server.properties"
LOG4J="$DATA_DIR/log4j2.properties"
LOG_DIRS="$DATA_DIR/kraft-combined-logs"
MARKER="$DATA_DIR/.kchat-kafka-local" # only a data dir holding this file is ever deleted

say() { printf '[kafka-local] %s\n' "$*"; }
die() {
  printf '[kafka-local] ERROR: %s\n' "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
usage: $0 start|stop|restart [--kill]|status|logs [-f|N]|fetch|env
  start   fetch the Kafka $KAFKA_VERSION jars if not cached, format a fresh KRaft log dir, start the
          broker on $HOST:$PORT (controller $HOST:$CONTROLLER_PORT) and wait until it answers clients
  stop    stop the broker (TERM, then KILL after ${STOP_TIMEOUT}s) and delete $DATA_DIR
  restart stop the broker (TERM; KILL with --kill, as a crash) and start it again on its data
  status  exit 0 when the broker is running and answering on $HOST:$PORT
  logs    print the broker log (last 200 lines; 'logs N' for N lines, 'logs -f' to follow)
  fetch   only download the jars into $LIBS
  env     print KAFKA_BROKERS=$HOST:$PORT (for: eval "\$($0 env)")
EOF
}

# ---------------------------------------------------------------------------------------------
# jars

jars_cached() {
  [[ -f "$CACHE_DIR/.complete" ]] &&
    [[ "$(cat "$CACHE_DIR/.complete")" == "$KAFKA_VERSION" ]] &&
    [[ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]]
}

ensure_jars() {
  jars_cached && return 0
  command -v mvn >/dev/null || die "mvn (Maven) is needed to fetch the Kafka jars"
  mkdir -p "$CACHE_DIR"
  # Two concurrent starts on one machine must not both write the cache.
  exec 9>"$CACHE_DIR/.lock"
  if command -v flock >/dev/null; then flock -w 900 9 || die "timed out waiting for $CACHE_DIR/.lock"; fi
  if jars_cached; then
    exec 9>&-
    return 0
  fi
  say "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies into $LIBS"
  local t0=$SECONDS
  rm -rf "$LIBS.tmp"
  if ! mvn -q -B -Dstyle.color=never -f "$POM" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" \
    >"$CACHE_DIR/mvn.log" 2>&1; then
    tail -n 40 "$CACHE_DIR/mvn.log" | sed 's/\x1b\[[0-9;]*m//g' >&2
    die "mvn could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (full output: $CACHE_DIR/mvn.log)"
  fi
  [[ -f "$LIBS.tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn"
  rm -rf "$LIBS"
  mv "$LIBS.tmp" "$LIBS"
  printf '%s\n' "$KAFKA_VERSION" >"$CACHE_DIR/.complete"
  say "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1)) in $((SECONDS - t0))s"
  exec 9>&-
}

check_java() {
  command -v java >/dev/null || die "java (17 or newer) is needed"
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
  [[ -z "$v" || "$v" -ge 17 ]] || die "Kafka 4 needs Java 17 or newer; found Java $v"
}

# For the short-lived StorageTool run: C1 only and the serial GC start faster than the broker flags.
tool_java() {
  java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Dlog4j2.configurationFile="$LOG4J" -cp "$LIBS/*" "$@"
}

# What kafka.tools.StorageTool random-uuid prints (org.apache.kafka.common.Uuid: 16 random bytes,
# URL-safe base64 without padding, never starting with '-'), without paying a JVM start for it.
random_cluster_id() {
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [[ ${#id} -eq 22 && "$id" != -* && "$id" != AAAAAAAAAAAAAAAAAAAAA[AQ] ]] && break
  done
  printf '%s\n' "$id"
}

# ---------------------------------------------------------------------------------------------
# process and readiness

broker_pid() {
  local pid
  if [[ -f "$PID_FILE" ]]; then
    pid=$(cat "$PID_FILE" 2>/dev/null || true)
    if [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" && is_our_broker "$pid"; then
      printf '%s\n' "$pid"
      return 0
    fi
  fi
  # The pid file can be gone while the broker still runs (data dir deleted by hand): look for
  # the java process started with this data dir's server.properties.
  local f
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}
    pid=${pid%/cmdline}
    if is_our_broker "$pid" && pid_alive "$pid"; then
      printf '%s\n' "$pid"
      return 0
    fi
  done
  return 1
}

is_our_broker() {
  local -a argv
  mapfile -d '' argv 2>/dev/null <"/proc/$1/cmdline" || return 1
  local n=${#argv[@]}
  ((n >= 3)) && [[ "${argv[0]}" == java || "${argv[0]}" == */java ]] &&
    [[ "${argv[n - 2]}" == kafka.Kafka && "${argv[n - 1]}" == "$PROPS" ]]
}

pid_alive() {
  # kill -0 is true for a zombie too; a reaped-late broker must count as stopped.
  kill -0 "$1" 2>/dev/null || return 1
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
  [[ "$state" != Z ]]
}

port_open() (
  { exec 3<>"/dev/tcp/$HOST/$1"; } 2>/dev/null || exit 1
  exec 3<&- 3>&-
)

# A real Kafka request: ApiVersions v0 (api key 18, correlation id 7, null client id). The broker
# only answers on its client listener once it has caught up with the metadata log and is serving.
api_versions_ok() (
  { exec 3<>"/dev/tcp/$HOST/$PORT"; } 2>/dev/null || exit 1
  printf '\x00\x00\x00\x0a\x00\x12\x00\x00\x00\x00\x00\x07\xff\xff' >&3
  hdr=$(timeout 5 head -c 10 <&3 | od -An -tx1 | tr -d ' \n') || exit 1
  exec 3<&- 3>&-
  # int32 size, int32 correlation id (7), int16 error code (0)
  [[ "${hdr:8:8}" == 00000007 && "${hdr:16:4}" == 0000 ]]
)

broker_ready() {
  grep -q 'Kafka Server started' "$LOG_FILE" 2>/dev/null && api_versions_ok
}

running_version() {
  local v
  v=$(sed -n 's/.*Kafka version: \([^ ]*\).*/\1/p' "$LOG_FILE" 2>/dev/null | head -n 1)
  printf '%s\n' "${v:-$KAFKA_VERSION}"
}

# ---------------------------------------------------------------------------------------------
# data dir

wipe_data_dir() {
  [[ -e "$DATA_DIR" ]] || return 0
  [[ -d "$DATA_DIR" ]] || die "$DATA_DIR is not a directory"
  if [[ ! -f "$MARKER" ]] && [[ -n "$(ls -A "$DATA_DIR")" ]]; then
    die "$DATA_DIR is not empty and was not made by kafka.sh ($MARKER missing); not deleting it"
  fi
  rm -rf "$DATA_DIR"
}

write_config() {
  mkdir -p "$DATA_DIR" "$LOG_DIRS"
  : >"$MARKER"
  cat >"$PROPS" <<EOF
# Written by deploy/kafka-local/kafka.sh: one-node KRaft, combined broker+controller.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$LOG_DIRS

num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  cat >"$LOG4J" <<EOF
# Written by deploy/kafka-local/kafka.sh: everything to stdout, which kafka.sh sends to kafka.log.
status = warn
name = kchat-kafka-local
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $LOG_LEVEL
rootLogger.appenderRef.stdout.ref = STDOUT
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
}

# ---------------------------------------------------------------------------------------------
# commands

wait_ready() {
  local pid=$1 t0=$2 deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! pid_alive "$pid"; then
      tail -n 60 "$LOG_FILE" >&2 || true
      die "the broker (pid $pid) exited during startup; log: $LOG_FILE"
    fi
    if broker_ready; then
      say "Kafka $(running_version) (kafka_2.13, KRaft broker+controller) is up on $HOST:$PORT after $((SECONDS - t0))s; pid $pid; log $LOG_FILE"
      return 0
    fi
    sleep 0.25
  done
  tail -n 60 "$LOG_FILE" >&2 || true
  kill_broker "$pid"
  die "the broker (pid $pid) did not answer on $HOST:$PORT within ${START_TIMEOUT}s, stopped it; log: $LOG_FILE"
}

# start and stop of one data dir never run at the same time (the broker itself must not inherit
# the lock: its fd is closed for it).
lock_data_dir() {
  command -v flock >/dev/null || return 0
  mkdir -p "$(dirname "$DATA_DIR")"
  exec 8>"$DATA_DIR.lock"
  flock -w $((START_TIMEOUT + 120)) 8 || die "timed out waiting for $DATA_DIR.lock"
}

cmd_start() {
  local t0=$SECONDS pid
  lock_data_dir
  if pid=$(broker_pid); then
    if broker_ready; then
      say "already running: Kafka $(running_version) on $HOST:$PORT (pid $pid)"
      return 0
    fi
    say "a broker is already starting (pid $pid); waiting for it"
    wait_ready "$pid" "$t0"
    return 0
  fi
  check_java
  port_open "$PORT" && die "$HOST:$PORT is already in use by a process kafka.sh did not start (KAFKA_PORT picks another port)"
  port_open "$CONTROLLER_PORT" && die "$HOST:$CONTROLLER_PORT is already in use (KAFKA_CONTROLLER_PORT picks another port)"
  ensure_jars

  wipe_data_dir # a broker that died leaves a formatted log dir; always start from a clean state
  write_config
  local cluster_id
  cluster_id=${KAFKA_CLUSTER_ID:-$(random_cluster_id)}
  # --standalone: this node alone is the initial (dynamic) KRaft controller quorum.
  tool_java kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS" --standalone >>"$LOG_FILE" 2>&1 ||
    {
      tail -n 30 "$LOG_FILE" >&2
      die "kafka.tools.StorageTool format failed; log: $LOG_FILE"
    }

  pid=$(launch_broker)
  say "started Kafka $KAFKA_VERSION (pid $pid, cluster id $cluster_id), waiting for $HOST:$PORT"
  wait_ready "$pid" "$t0"
}

# Starts the broker on the formatted data dir and prints its pid.
launch_broker() {
  # setsid: the broker outlives this script and the caller's process group; the child writes its
  # own pid (exec keeps it) so the pid file is exact.
  local heap jvm i
  read -r -a heap <<<"$HEAP_OPTS"
  read -r -a jvm <<<"$JVM_OPTS"
  rm -f "$PID_FILE"
  # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PID_FILE" \
    java "${heap[@]}" "${jvm[@]}" -Dlog4j2.configurationFile="$LOG4J" -cp "$LIBS/*" kafka.Kafka "$PROPS" \
    >>"$LOG_FILE" 2>&1 </dev/null 8>&- 9>&- &
  for ((i = 0; i < 50; i++)); do
    [[ -s "$PID_FILE" ]] && break
    sleep 0.1
  done
  cat "$PID_FILE" 2>/dev/null || die "the broker did not start; log: $LOG_FILE"
}

# Stops the running broker (TERM, or KILL with --kill: a crash) and starts it again on the same
# data, as after a reboot: what it acknowledged must still be there.
cmd_restart() {
  local t0=$SECONDS pid
  lock_data_dir
  pid=$(broker_pid) || die "not running: nothing to restart"
  if [[ "${1:-}" == --kill ]]; then
    say "killing Kafka (pid $pid) with SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while pid_alive "$pid"; do sleep 0.1; done
  else
    say "stopping Kafka (pid $pid)"
    kill_broker "$pid"
  fi
  # broker_ready reads the log for the start line: the new run starts a new log.
  mv "$LOG_FILE" "$LOG_FILE.previous"
  pid=$(launch_broker)
  say "restarted Kafka on its data (pid $pid), waiting for $HOST:$PORT"
  wait_ready "$pid" "$t0"
}

kill_broker() {
  local pid=$1 deadline=$((SECONDS + STOP_TIMEOUT))
  kill -TERM "$pid" 2>/dev/null || true
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if pid_alive "$pid"; then
    say "pid $pid still running after ${STOP_TIMEOUT}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    pid_alive "$pid" && die "pid $pid survived KILL"
  fi
  return 0
}

cmd_stop() {
  local pid
  lock_data_dir
  if pid=$(broker_pid); then
    say "stopping Kafka (pid $pid)"
    kill_broker "$pid"
    say "stopped"
  else
    say "not running"
  fi
  wipe_data_dir
}

cmd_status() {
  local pid
  if ! pid=$(broker_pid); then
    say "not running"
    return 3
  fi
  if broker_ready; then
    say "running: Kafka $(running_version) on $HOST:$PORT (pid $pid)"
    return 0
  fi
  say "pid $pid is alive but $HOST:$PORT does not answer (starting, or unhealthy)"
  return 1
}

cmd_logs() {
  [[ -f "$LOG_FILE" ]] || die "no log at $LOG_FILE (not started?)"
  case "${1:-}" in
  -f) exec tail -n 200 -F "$LOG_FILE" ;;
  '') tail -n 200 "$LOG_FILE" ;;
  *) tail -n "$1" "$LOG_FILE" ;;
  esac
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
restart) cmd_restart "${2:-}" ;;
status) cmd_status ;;
logs) cmd_logs "${2:-}" ;;
fetch)
  ensure_jars
  say "Kafka $KAFKA_VERSION jars in $LIBS"
  ;;
env) printf 'KAFKA_BROKERS=%s:%s\n' "$HOST" "$PORT" ;;
-h | --help | help) usage ;;
*)
  usage >&2
  exit 2
  ;;
esac
