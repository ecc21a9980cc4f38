#!/usr/bin/env bash
# Local Confluent-compatible schema registry for dev/CI: Apicurio Registry
# (Quarkus app from Maven Central, in-memory H2 storage), bound to 127.0.0.1.
#
#   registry.sh start|stop|status
#
# start/status print, on stdout, lines usable with eval or a dotenv file:
#   REGISTRY_VERSION=3.3.3
#   SCHEMA_REGISTRY_URL=http://127.0.0.1:8081/apis/ccompat/v7
# Everything else goes to stderr.
#
# Environment (all optional):
#   REGISTRY_VERSION        Apicurio version. Unset: 3.3.3 when a Java >= 21 is found
#                           (JAVA_HOME, PATH, /usr/lib/jvm/*), otherwise 3.0.9 (Java 17).
#                           2.x (e.g. 2.6.13.Final) also works; its API is ccompat/v6.
#   REGISTRY_PORT           HTTP port (default 8081)
#   REGISTRY_MGMT_PORT      Quarkus management port, 3.3+ (default REGISTRY_PORT+1000)
#   REGISTRY_CACHE_DIR      unpacked app, kept between runs
#                           (default ~/.cache/kchat/apicurio/<version>)
#   REGISTRY_DATA_DIR       log, pid file, tmp (default /tmp/kchat-registry); removed by stop
#   REGISTRY_HEAP           max heap (default 384m)
#   REGISTRY_JAVA           java binary to use (must be new enough for the version)
#   REGISTRY_JAVA_OPTS      extra JVM options / -D properties, appended last
#   REGISTRY_START_TIMEOUT  seconds to wait for readiness (default 120)
#   REGISTRY_STOP_TIMEOUT   seconds between TERM and KILL (default 30)
#   MVN                     maven command (default mvn)
set -euo pipefail

DEFAULT_VERSION=3.3.3  # compiled for Java 21
FALLBACK_VERSION=3.0.9 # compiled for Java 17

REGISTRY_PORT="${REGISTRY_PORT:-8081}"
REGISTRY_MGMT_PORT="${REGISTRY_MGMT_PORT:-$((REGISTRY_PORT + 1000))}"
REGISTRY_DATA_DIR="${REGISTRY_DATA_DIR:-/tmp/kchat-registry}"
REGISTRY_HEAP="${REGISTRY_HEAP:-384m}"
REGISTRY_JAVA_OPTS="${REGISTRY_JAVA_OPTS:-}"
REGISTRY_START_TIMEOUT="${REGISTRY_START_TIMEOUT:-120}"
REGISTRY_STOP_TIMEOUT="${REGISTRY_STOP_TIMEOUT:-30}"
MVN="${MVN:-mvn}"

HOST=127.0.0.1
BASE_URL="http://${HOST}:${REGISTRY_PORT}"
PID_FILE="${REGISTRY_DATA_DIR}/registry.pid"
LOG_FILE="${REGISTRY_DATA_DIR}/registry.log"
VERSION_FILE="${REGISTRY_DATA_DIR}/registry.version"
MARKER_FILE="${REGISTRY_DATA_DIR}/.kchat-registry"
# Tag on the JVM command line so stop only ever signals a process we started.
PROC_TAG="-Dkchat.registry.datadir=${REGISTRY_DATA_DIR}"
REQUESTED_VERSION="${REGISTRY_VERSION:-}"

log() { echo "registry.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

set_version() { # version -> VERSION MAJOR JAVA_MIN CCOMPAT_PATH INFO_PATH CCOMPAT_URL
  VERSION="$1"
  MAJOR="${VERSION%%.*}"
  local minor="${VERSION#*.}"
  minor="${minor%%.*}"
  case "$MAJOR" in
    3)
      CCOMPAT_PATH=/apis/ccompat/v7
      INFO_PATH=/apis/registry/v3/system/info
      # 3.3.x ships class files for Java 21 (major 65); 3.0.x for Java 17 (61).
      if [[ "$minor" =~ ^[0-9]+$ ]] && [ "$minor" -ge 3 ]; then JAVA_MIN=21; else JAVA_MIN=17; fi
      ;;
    2)
      CCOMPAT_PATH=/apis/ccompat/v6
      INFO_PATH=/apis/registry/v2/system/info
      JAVA_MIN=11
      ;;
    *) die "unsupported Apicurio version '${VERSION}'" ;;
  esac
  CCOMPAT_URL="${BASE_URL}${CCOMPAT_PATH}"
}

# For stop/status: the version recorded by start, else the requested/default one.
if [ -n "$REQUESTED_VERSION" ]; then
  set_version "$REQUESTED_VERSION"
elif [ -s "$VERSION_FILE" ]; then
  set_version "$(cat "$VERSION_FILE")"
else
  set_version "$DEFAULT_VERSION"
fi

http_code() { # url -> HTTP status, 000 when nothing answers
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" 2>/dev/null || true
}

answers() { [ "$(http_code "${CCOMPAT_URL}/subjects")" = 200 ]; }

running_version() {
  curl -s --max-time 5 "${BASE_URL}${INFO_PATH}" 2>/dev/null |
    sed -n 's/.*"version" *: *"\([^"]*\)".*/\1/p' || true
}

our_pid() { # prints the pid from the pid file if it is a process we started
  local pid
  [ -f "$PID_FILE" ] || return 1
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/${pid}/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -qF -- "$PROC_TAG" || return 1
  echo "$pid"
}

java_major() { # java binary -> major version
  "$1" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}' |
    awk -F. '{ if ($1 == "1") print $2; else print $1 }'
}

pick_java() { # min major -> path of the first suitable java
  local min="$1" c v
  local -a candidates=()
  if [ -n "${REGISTRY_JAVA:-}" ]; then
    candidates=("$REGISTRY_JAVA")
  else
    [ -n "${JAVA_HOME:-}" ] && candidates+=("${JAVA_HOME}/bin/java")
    command -v java >/dev/null 2>&1 && candidates+=("$(command -v java)")
    for c in /usr/lib/jvm/*/bin/java; do [ -x "$c" ] && candidates+=("$c"); done
  fi
  for c in "${candidates[@]}"; do
    [ -x "$c" ] || continue
    v="$(java_major "$c" 2>/dev/null || true)"
    if [[ "$v" =~ ^[0-9]+$ ]] && [ "$v" -ge "$min" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

resolve_for_start() { # sets VERSION vars, JAVA, cache paths
  if [ -n "$REQUESTED_VERSION" ]; then
    set_version "$REQUESTED_VERSION"
    JAVA="$(pick_java "$JAVA_MIN")" ||
      die "Apicurio ${VERSION} needs Java >= ${JAVA_MIN}; none found (set REGISTRY_JAVA or JAVA_HOME)"
  else
    set_version "$DEFAULT_VERSION"
    if ! JAVA="$(pick_java "$JAVA_MIN")"; then
      log "no Java >= ${JAVA_MIN} for Apicurio ${DEFAULT_VERSION}; using ${FALLBACK_VERSION}"
      set_version "$FALLBACK_VERSION"
      JAVA="$(pick_java "$JAVA_MIN")" || die "no Java >= ${JAVA_MIN} found"
    fi
  fi
  CACHE_DIR="${REGISTRY_CACHE_DIR:-${HOME:-/tmp}/.cache/kchat/apicurio/${VERSION}}"
  APP_DIR="${CACHE_DIR}/app"
  ARTIFACT="io.apicurio:apicurio-registry-app:${VERSION}:tar.gz:all"
}

fetch() { # download with Maven and unpack into the cache, once
  local stamp="${CACHE_DIR}/.unpacked"
  [ -f "$stamp" ] && return 0
  command -v "$MVN" >/dev/null 2>&1 || die "maven ('${MVN}') not found"
  mkdir -p "$CACHE_DIR"
  exec 9>"${CACHE_DIR}/.lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
  if [ ! -f "$stamp" ]; then
    local tgz="${CACHE_DIR}/apicurio-registry-app-${VERSION}-all.tar.gz"
    log "fetching ${ARTIFACT} with Maven into ${CACHE_DIR}"
    # maven-dependency-plugin 2.8 'get' with transitive=false fetches just the
    # archive. Newer plugin versions also resolve the parent POM, which Central
    # lacks for some releases (io.apicurio:apicurio-registry:3.0.9).
    if ! "$MVN" -B -q -C org.apache.maven.plugins:maven-dependency-plugin:2.8:get \
      -Dartifact="$ARTIFACT" -Dtransitive=false -Ddest="$tgz" >"${CACHE_DIR}/mvn.log" 2>&1; then
      cat "${CACHE_DIR}/mvn.log" >&2
      die "could not fetch ${ARTIFACT}"
    fi
    [ -s "$tgz" ] || die "maven reported success but ${tgz} is missing"
    rm -rf "${APP_DIR}.tmp" "$APP_DIR"
    mkdir -p "${APP_DIR}.tmp"
    tar -xzf "$tgz" -C "${APP_DIR}.tmp"
    mv "${APP_DIR}.tmp" "$APP_DIR"
    rm -f "$tgz" # a copy stays in the local Maven repository
    date -u +%FT%TZ >"$stamp"
  fi
  exec 9>&-
}

app_jar() { # 3.3+: fast-jar quarkus-run.jar; 2.x/3.0: uber *-runner.jar
  local j
  if [ -f "${APP_DIR}/quarkus-run.jar" ]; then
    echo "${APP_DIR}/quarkus-run.jar"
    return 0
  fi
  for j in "${APP_DIR}"/*-runner.jar; do
    if [ -f "$j" ]; then
      echo "$j"
      return 0
    fi
  done
  return 1
}

print_info() {
  local v
  v="$(running_version)"
  log "Apicurio Registry ${v:-$VERSION} on ${BASE_URL} (pid $(our_pid || echo '?'), log ${LOG_FILE})"
  echo "REGISTRY_VERSION=${v:-$VERSION}"
  echo "SCHEMA_REGISTRY_URL=${CCOMPAT_URL}"
}

ensure_backward() {
  # The default global rule is the app property apicurio.rules.global.compatibility
  # (registry.rules.global.compatibility on 2.x). 3.0.x enforces it but its ccompat
  # GET /config still says NONE, so in that case store it with PUT /config too.
  local cfg
  cfg="$(curl -s --max-time 5 "${CCOMPAT_URL}/config" || true)"
  if ! grep -q '"BACKWARD"' <<<"$cfg"; then
    log "ccompat GET /config said ${cfg:-nothing}; setting BACKWARD with PUT /config"
    curl -sf --max-time 5 -X PUT -H 'Content-Type: application/vnd.schemaregistry.v1+json' \
      --data '{"compatibility":"BACKWARD"}' "${CCOMPAT_URL}/config" >/dev/null ||
      die "PUT ${CCOMPAT_URL}/config failed"
  fi
}

wait_ready() { # pid
  local pid="$1" deadline=$((SECONDS + REGISTRY_START_TIMEOUT))
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$LOG_FILE" >&2 || true
      die "registry process ${pid} exited during startup (log: ${LOG_FILE})"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 40 "$LOG_FILE" >&2 || true
      die "no 200 from ${CCOMPAT_URL}/subjects within ${REGISTRY_START_TIMEOUT}s (pid ${pid} left running; log: ${LOG_FILE})"
    fi
    sleep 0.5
  done
}

cmd_start() {
  local pid jar t0 running
  command -v curl >/dev/null 2>&1 || die "curl not found"
  if pid="$(our_pid)"; then
    wait_ready "$pid"
    running="$(running_version)"
    if [ -n "$REQUESTED_VERSION" ] && [ -n "$running" ] && [ "$running" != "$REQUESTED_VERSION" ]; then
      die "Apicurio ${running} is already running on ${HOST}:${REGISTRY_PORT} (requested ${REQUESTED_VERSION}); run '$0 stop' first"
    fi
    ensure_backward
    log "already running"
    print_info
    return 0
  fi
  if [ "$(http_code "${BASE_URL}/")" != 000 ]; then
    die "something not started by this script already listens on ${HOST}:${REGISTRY_PORT}"
  fi

  resolve_for_start
  fetch
  jar="$(app_jar)" || die "no runnable jar in ${APP_DIR}"

  mkdir -p "${REGISTRY_DATA_DIR}/tmp"
  : >"$MARKER_FILE"
  echo "$VERSION" >"$VERSION_FILE"
  rm -f "$PID_FILE"

  local -a props=(
    "-Dquarkus.http.host=${HOST}"
    "-Dquarkus.http.port=${REGISTRY_PORT}"
    "-Djava.io.tmpdir=${REGISTRY_DATA_DIR}/tmp"
  )
  if [ "$MAJOR" = 3 ]; then
    props+=(
      "-Dquarkus.management.host=${HOST}"
      "-Dquarkus.management.port=${REGISTRY_MGMT_PORT}"
      "-Dapicurio.storage.kind=sql"
      "-Dapicurio.storage.sql.kind=h2"
      "-Dapicurio.datasource.url=jdbc:h2:mem:kchat"
      "-Dapicurio.datasource.jdbc.initial-size=2"
      "-Dapicurio.datasource.jdbc.min-size=2"
      "-Dapicurio.datasource.jdbc.max-size=20"
      "-Dapicurio.storage.snapshot.location=${REGISTRY_DATA_DIR}/tmp"
      "-Dapicurio.import.work-dir=${REGISTRY_DATA_DIR}/tmp"
      "-Dapicurio.rules.global.compatibility=BACKWARD"
      # Same id for the same schema written differently (whitespace, key order),
      # as Confluent does; 3.3 already behaves so, 3.0 needs the flag.
      "-Dapicurio.ccompat.use-canonical-hash=true"
    )
  else
    props+=(
      "-Dquarkus.datasource.jdbc.initial-size=2"
      "-Dquarkus.datasource.jdbc.min-size=2"
      "-Dquarkus.datasource.jdbc.max-size=20"
      "-Dregistry.rules.global.compatibility=BACKWARD"
      "-Dregistry.ccompat.use-canonical-hash=true"
    )
  fi

  # Serial GC and C1-only JIT: smaller footprint and quicker start on 2 cores;
  # a test registry needs no peak throughput. REGISTRY_JAVA_OPTS can override.
  t0=$SECONDS
  log "starting Apicurio ${VERSION} ($("$JAVA" -version 2>&1 | head -n1)) on ${HOST}:${REGISTRY_PORT}"
  # shellcheck disable=SC2086 # REGISTRY_JAVA_OPTS is a list of options on purpose
  (cd "$REGISTRY_DATA_DIR" && exec "$JAVA" "$PROC_TAG" "-Xmx${REGISTRY_HEAP}" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    "${props[@]}" ${REGISTRY_JAVA_OPTS} -jar "$jar") \
    </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  echo "$pid" >"$PID_FILE"
  wait_ready "$pid"
  ensure_backward
  log "ready after $((SECONDS - t0))s"
  print_info
}

cmd_stop() {
  local pid deadline
  if pid="$(our_pid)"; then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + REGISTRY_STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid ${pid} still alive after ${REGISTRY_STOP_TIMEOUT}s, sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    log "stopped (pid ${pid})"
  else
    log "not running (no live process from ${PID_FILE})"
  fi
  # Only ever remove a data dir this script created.
  if [ -f "$MARKER_FILE" ]; then rm -rf -- "$REGISTRY_DATA_DIR"; fi
}

cmd_status() {
  local pid
  if answers; then
    print_info
    return 0
  fi
  if pid="$(our_pid)"; then
    log "process ${pid} is alive but ${CCOMPAT_URL}/subjects does not answer 200"
  else
    log "not running (${CCOMPAT_URL})"
  fi
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
