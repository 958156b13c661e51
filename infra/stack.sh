#!/usr/bin/env bash
# KLM local infrastructure: Kafka (KRaft, jars from Maven Central), PostgreSQL
# (the distribution's server, one cluster in a data folder) and SoftHSMv2.
#
#   infra/stack.sh install               apt packages + Kafka classpath (idempotent)
#   infra/stack.sh up [kafka|postgres|hsm ...]   start what is not running (default: all)
#   infra/stack.sh down [kafka|postgres ...]     stop Kafka and Postgres (data is kept)
#   infra/stack.sh status [component ...]        one line each; exit 3 if one is stopped
#   infra/stack.sh env                   export lines: eval "$(infra/stack.sh env)"
#   infra/stack.sh reset                 down + delete the data under $KLM_HOME
#   infra/stack.sh kafka-acls [PREFIX]   (sasl) users, tenant topics, ACLs for a topic prefix
#   infra/stack.sh kafka-drop-acls PREFIX   (sasl) delete the ACLs of a test namespace
#   infra/stack.sh kafka-tenant NAME     (sasl) add a requesting tenant: user, topic, ACLs
#   infra/stack.sh kafka-list-acls       (sasl) print the ACL bindings
#
# Everything lives under $KLM_HOME (default <repo>/.klm):
#   kafka/{server.properties,data,classpath.txt}  pg/  hsm/{softhsm2.conf,tokens}
#   secrets/{pg-admin-password,hsm-pin,hsm-so-pin}  logs/  run/
#
# Environment knobs: KLM_HOME, KLM_KAFKA_PORT (9092), KLM_KAFKA_CONTROLLER_PORT
# (9093), KAFKA_HEAP_OPTS (-Xms256m -Xmx512m), KLM_PG_PORT (5432),
# KLM_HSM_TOKEN_LABEL (klm), KLM_JAVA (path of a Java 17+ binary),
# KLM_KAFKA_START_TIMEOUT (120 s), KLM_STOP_TIMEOUT (30 s).
#
# Kafka security (docs/security.md): KLM_KAFKA_SECURITY=sasl (the default for a new
# cluster: SASL/SCRAM-SHA-512 for clients, PLAIN on the KRaft controller
# listener, StandardAuthorizer, allow.everyone.if.no.acl.found=false, super users admin
# and controller; one SCRAM user per service - keygen rotation backup audit - plus admin
# and the tenants of KLM_KAFKA_TENANTS (default "billing payments"), passwords in
# secrets/kafka-<user>-password) or none (PLAINTEXT, no authorizer: for a quick local
# try only). The mode is fixed when the storage is formatted: switching an existing
# cluster needs `reset` (or another KLM_HOME).
set -euo pipefail

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(dirname "$INFRA_DIR")"
KLM_HOME="${KLM_HOME:-$REPO_DIR/.klm}"
mkdir -p "$KLM_HOME"
KLM_HOME="$(cd "$KLM_HOME" && pwd -P)"

KAFKA_PORT="${KLM_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KLM_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_START_TIMEOUT="${KLM_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${KLM_STOP_TIMEOUT:-30}"
PG_PORT="${KLM_PG_PORT:-5432}"
HSM_LABEL="${KLM_HSM_TOKEN_LABEL:-klm}"
KAFKA_TENANTS="${KLM_KAFKA_TENANTS:-billing payments}"
KAFKA_SERVICES="keygen rotation backup audit"

SECRETS="$KLM_HOME/secrets"
LOGS="$KLM_HOME/logs"
RUN="$KLM_HOME/run"
KAFKA_DIR="$KLM_HOME/kafka"
KAFKA_CP_FILE="$KAFKA_DIR/classpath.txt"
KAFKA_CP_STAMP="$KAFKA_DIR/classpath.pom.sha256"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_PID="$RUN/kafka.pid"
KAFKA_MODE_FILE="$KAFKA_DIR/security-mode"
# the one switch for Kafka security (sasl | none; see the header). Unset: sasl for a new
# cluster, and an existing cluster keeps the mode it was formatted in (a cluster formatted
# before the mode was recorded ran PLAINTEXT)
if [[ -n "${KLM_KAFKA_SECURITY:-}" ]]; then
  KAFKA_SECURITY="$KLM_KAFKA_SECURITY"
  KAFKA_SECURITY_CHOSEN=1
elif [[ -f "$KAFKA_DIR/data/meta.properties" ]]; then
  KAFKA_SECURITY="$(cat "$KAFKA_MODE_FILE" 2>/dev/null || echo none)"
  KAFKA_SECURITY_CHOSEN=0
else
  KAFKA_SECURITY=sasl
  KAFKA_SECURITY_CHOSEN=0
fi
KAFKA_ADMIN_PROPS="$KAFKA_DIR/admin-client.properties"
KAFKA_TENANTS_FILE="$KAFKA_DIR/tenants"
HSM_DIR="$KLM_HOME/hsm"
HSM_CONF="$HSM_DIR/softhsm2.conf"

say() { printf '%s\n' "$*"; }
note() { printf '%s\n' "$*" >&2; }
die() { printf 'stack.sh: %s\n' "$*" >&2; exit 1; }
is_root() { [[ $EUID -eq 0 ]]; }

# ---------------------------------------------------------------- install ---

pkg_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# apt-get install the given Debian packages that are missing; `apt-get update`
# only when something is to be installed.
ensure_packages() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "missing packages: ${missing[*]} (no apt-get)"
  local sudo=()
  if ! is_root; then
    command -v sudo >/dev/null || die "missing packages: ${missing[*]} (run as root)"
    sudo=(sudo)
  fi
  # The postgresql package would create and start a system "main" cluster on
  # port 5432, which would take our port: tell postgresql-common not to.
  if [[ " ${missing[*]} " == *" postgresql "* ]] && ! pkg_installed postgresql-common; then
    "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" |
      "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/klm.conf >/dev/null
  fi
  note "apt-get install ${missing[*]} (log: $LOGS/apt.log)"
  mkdir -p "$LOGS"
  { "${sudo[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"; } >>"$LOGS/apt.log" 2>&1 ||
    die "apt-get install ${missing[*]} failed, see $LOGS/apt.log"
}

find_java() {
  local j
  # Java 17 first (what Kafka is tested with here), even if JAVA_HOME is newer
  for j in "${KLM_JAVA:-}" /usr/lib/jvm/java-17-openjdk-*/bin/java \
           "${JAVA_HOME:+$JAVA_HOME/bin/java}" /usr/lib/jvm/java-21-openjdk-*/bin/java \
           "$(command -v java || true)"; do
    [[ -n "$j" && -x "$j" ]] || continue
    local v
    v="$("$j" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')"
    if [[ "${v%%.*}" =~ ^[0-9]+$ ]] && ((${v%%.*} >= 17)); then
      echo "$j"; return 0
    fi
  done
  return 1
}

JAVA_BIN=""
java_bin() {
  [[ -n "$JAVA_BIN" ]] || JAVA_BIN="$(find_java)" || die "no Java 17+ found (set KLM_JAVA)"
  echo "$JAVA_BIN"
}

have_pg_server() {
  local d
  for d in ${KLM_PG_BIN:-} /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && return 0
  done
  return 1
}

# install (apt) what a component needs when its programs are missing
ensure_tools() {
  local want=()
  for comp in "$@"; do
    case "$comp" in
      kafka)
        find_java >/dev/null || want+=(openjdk-17-jre-headless)
        command -v mvn >/dev/null || want+=(maven)
        command -v python3 >/dev/null || want+=(python3) ;;
      postgres) have_pg_server || want+=(postgresql) ;;
      hsm) command -v softhsm2-util >/dev/null || want+=(softhsm2) ;;
      # the audit chain's C loops (libs/klm-chainlink): a compiler and OpenSSL's headers
      build)
        command -v gcc >/dev/null || want+=(gcc)
        [[ -f /usr/include/openssl/sha.h ]] || want+=(libssl-dev) ;;
    esac
  done
  ((${#want[@]})) && ensure_packages "${want[@]}"
  return 0
}

pom_sha() { sha256sum "$INFRA_DIR/kafka/pom.xml" | cut -d' ' -f1; }

classpath_ok() {
  [[ -s "$KAFKA_CP_FILE" && -f "$KAFKA_CP_STAMP" ]] || return 1
  [[ "$(cat "$KAFKA_CP_STAMP")" == "$(pom_sha)" ]] || return 1
  local jar jars
  IFS=: read -r -a jars <"$KAFKA_CP_FILE" || true
  for jar in "${jars[@]}"; do [[ -f "$jar" ]] || return 1; done
}

# Resolve the broker's jars with Maven (local repo: the default ~/.m2) into a
# cached classpath file; redone only when pom.xml changed or a jar is gone.
ensure_classpath() {
  classpath_ok && return 0
  mkdir -p "$KAFKA_DIR"
  note "kafka: resolving jars with maven (infra/kafka/pom.xml)"
  local tmp="$KAFKA_CP_FILE.tmp"
  mkdir -p "$LOGS"
  (cd "$INFRA_DIR/kafka" &&
    mvn -q -B -Dstyle.color=never dependency:build-classpath \
      -Dmdep.outputFile="$tmp" >"$LOGS/maven.log" 2>&1) ||
    die "maven could not resolve infra/kafka/pom.xml, see $LOGS/maven.log"
  mv "$tmp" "$KAFKA_CP_FILE"
  pom_sha >"$KAFKA_CP_STAMP"
}

cmd_install() {
  ensure_tools kafka postgres hsm build
  ensure_classpath
  say "install: ok (java $(java_bin), $(kafka_version))"
}

kafka_version() {
  local jar
  jar="$(tr ':' '\n' <"$KAFKA_CP_FILE" | grep -m1 '/kafka_2.13-')" || true
  jar="${jar##*/kafka_2.13-}"
  echo "kafka ${jar%.jar}"
}

# ---------------------------------------------------------------- helpers ---

# a random hex secret, written once (mode 600)
ensure_secret() {
  local file="$SECRETS/$1" bytes="${2:-24}"
  [[ -s "$file" ]] && return 0
  mkdir -p "$SECRETS"
  chmod 700 "$SECRETS"
  (umask 077 && od -An -tx1 -N"$bytes" /dev/urandom | tr -d ' \n' >"$file.$$")
  # ln is atomic and never replaces: with two concurrent callers, one wins
  ln "$file.$$" "$file" 2>/dev/null || true
  rm -f "$file.$$"
}

port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# $1 has a live process whose command line contains every further argument
pid_matches() {
  local pid="$1"; shift
  [[ "$pid" =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  local cmdline
  cmdline="$(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null)" || return 1
  local s
  for s in "$@"; do [[ "$cmdline" == *"$s"* ]] || return 1; done
}

# stop a pid: SIGTERM, wait, then SIGKILL
stop_pid() {
  local pid="$1" name="$2" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  note "$name: no exit after ${STOP_TIMEOUT}s, killing"
  kill -KILL "$pid" 2>/dev/null || true
}

# ------------------------------------------------------------------ kafka ---

# pid of the broker of this KLM_HOME, from the pid file or (if that is lost
# or stale, e.g. after a reboot) from /proc; empty if none runs.
kafka_pid() {
  local pid=""
  [[ -f "$KAFKA_PID" ]] && pid="$(cat "$KAFKA_PID" 2>/dev/null || true)"
  if pid_matches "$pid" kafka.Kafka "$KAFKA_PROPS"; then echo "$pid"; return 0; fi
  rm -f "$KAFKA_PID"
  local f
  for f in $(grep -lsF -- "$KAFKA_PROPS" /proc/[0-9]*/cmdline 2>/dev/null || true); do
    pid="${f#/proc/}"; pid="${pid%/cmdline}"
    if pid_matches "$pid" kafka.Kafka "$KAFKA_PROPS"; then
      mkdir -p "$RUN"; echo "$pid" >"$KAFKA_PID"; echo "$pid"; return 0
    fi
  done
  return 0
}

kafka_listener_props() {
  if [[ "$KAFKA_SECURITY" != sasl ]]; then
    cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://localhost:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
EOF
    return 0
  fi
  local admin_pw controller_pw
  admin_pw="$(cat "$SECRETS/kafka-admin-password")"
  controller_pw="$(cat "$SECRETS/kafka-controller-password")"
  # SCRAM credentials live in the metadata log, which the controller serves: the KRaft
  # controller listener cannot use SCRAM, so it uses PLAIN with one JAAS-defined user
  # (not PLAINTEXT: an anonymous controller listener would need ANONYMOUS as a super user,
  # i.e. any local process could administer the cluster through it).
  cat <<EOF
listeners=SASL_PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=SASL_PLAINTEXT://localhost:$KAFKA_PORT
inter.broker.listener.name=SASL_PLAINTEXT
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_pw";
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="controller" password="$controller_pw" user_controller="$controller_pw";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:controller
# a failed login is answered after this delay (slows password guessing)
connection.failed.authentication.delay.ms=1000
EOF
}

write_kafka_props() {
  mkdir -p "$KAFKA_DIR/data"
  local listeners
  listeners="$(kafka_listener_props)"
  # mode 600: in sasl mode the file holds the admin and controller passwords
  (umask 077 && cat >"$KAFKA_PROPS.tmp" <<EOF
# generated by infra/stack.sh on each start; edit the script, not this file
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
$listeners
log.dirs=$KAFKA_DIR/data
num.partitions=6
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# after a crash the old registration must time out before the broker can
# register again: 5 s instead of the default 9 s
broker.session.timeout.ms=5000
broker.heartbeat.interval.ms=1000
num.network.threads=2
num.io.threads=4
EOF
  )
  mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
}

kafka_ready() {  # $1: timeout seconds, $2: pid to watch (optional)
  local auth=()
  [[ "$KAFKA_SECURITY" == sasl ]] &&
    auth=(--scram-user admin --scram-password-file "$SECRETS/kafka-admin-password")
  python3 "$INFRA_DIR/kafka/kafka_ready.py" "127.0.0.1:$KAFKA_PORT" \
    --timeout "$1" ${2:+--pid "$2"} "${auth[@]}" >/dev/null
}

# ------------------------------------------------------- kafka security ---

# tenants: KLM_KAFKA_TENANTS plus those added with `kafka-tenant`
kafka_tenants() {
  # shellcheck disable=SC2086  # a space-separated list
  { printf '%s\n' $KAFKA_TENANTS; [[ -f "$KAFKA_TENANTS_FILE" ]] && cat "$KAFKA_TENANTS_FILE"; } |
    awk 'NF && !seen[$0]++'
}

# the SCRAM users: admin, one per service, one per tenant
kafka_users() {
  # shellcheck disable=SC2086  # a space-separated list
  printf '%s\n' admin $KAFKA_SERVICES
  kafka_tenants
}

kafka_secrets() {
  local u
  ensure_secret kafka-controller-password
  for u in $(kafka_users); do ensure_secret "kafka-$u-password"; done
}

# --add-scram arguments of `StorageTool format` (KIP-900): users exist from the first start
kafka_scram_args() {
  local u
  for u in $(kafka_users); do
    printf -- '--add-scram\nSCRAM-SHA-512=[name=%s,password=%s]\n' \
      "$u" "$(cat "$SECRETS/kafka-$u-password")"
  done
}

write_admin_client_props() {
  (umask 077 && cat >"$KAFKA_ADMIN_PROPS.tmp" <<EOF
# written by infra/stack.sh: the admin's client login (mode 600)
bootstrap.servers=127.0.0.1:$KAFKA_PORT
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$SECRETS/kafka-admin-password")";
request.timeout.ms=30000
EOF
  )
  mv "$KAFKA_ADMIN_PROPS.tmp" "$KAFKA_ADMIN_PROPS"
}

# run infra/kafka/KlmKafkaAdmin.java (the JDK's source launcher) as admin
kafka_admin() {
  [[ "$KAFKA_SECURITY" == sasl ]] || die "kafka: $1 needs KLM_KAFKA_SECURITY=sasl"
  ensure_classpath
  write_admin_client_props
  "$(java_bin)" -cp "$(cat "$KAFKA_CP_FILE")" \
    -Dlog4j2.configurationFile="$INFRA_DIR/kafka/log4j2.properties" -Dkafka.logs.dir="$LOGS" \
    "$INFRA_DIR/kafka/KlmKafkaAdmin.java" "$KAFKA_ADMIN_PROPS" "$@"
}

# users (upsert: also those added after the format), the tenants' request topics and the
# ACLs of infra/kafka/acl_plan.py, for topic prefix $1 (empty: production names)
kafka_apply_security() {
  local prefix="${1:-}" u tenant_args=()
  kafka_secrets
  for u in $(kafka_tenants); do tenant_args+=(--tenant "$u"); done
  {
    for u in $(kafka_users); do echo "user $u $SECRETS/kafka-$u-password"; done
    python3 "$INFRA_DIR/kafka/acl_plan.py" --prefix "$prefix" --tenant-topics \
      "${tenant_args[@]}" | sed 's/^/topic /'
    python3 "$INFRA_DIR/kafka/acl_plan.py" --prefix "$prefix" "${tenant_args[@]}" |
      sed 's/^/acl /'
  } | kafka_admin apply >>"$LOGS/kafka-admin.log" 2>&1 ||
    die "kafka: applying users/topics/ACLs failed, see $LOGS/kafka-admin.log"
  say "kafka: users, tenant topics and ACLs applied (prefix '$prefix';" \
      "tenants: $(kafka_tenants | tr '\n' ' '))"
}

# every ACL on a name under topic prefix $1 (a test or benchmark namespace, its
# sub-namespaces included) deleted when the namespace is; production names are refused
kafka_drop_acls() {
  local prefix="${1:-}"
  [[ -n "$prefix" ]] || die "kafka-drop-acls needs a namespace prefix (production ACLs stay)"
  kafka_admin drop-prefix "$prefix" >>"$LOGS/kafka-admin.log" 2>&1 ||
    die "kafka: deleting the ACLs under '$prefix' failed, see $LOGS/kafka-admin.log"
  say "kafka: ACLs under '$prefix' deleted"
}

# a cluster runs in the security mode it was formatted in
kafka_check_mode() {
  local formatted="none"
  [[ -f "$KAFKA_MODE_FILE" ]] && formatted="$(cat "$KAFKA_MODE_FILE")"
  [[ "$formatted" == "$KAFKA_SECURITY" ]] && return 0
  die "kafka: the storage in $KAFKA_DIR/data was formatted with security '$formatted'," \
      "not '$KAFKA_SECURITY' (infra/stack.sh reset, or use another KLM_HOME)"
}

# start the broker in the background (no waiting); echoes nothing
kafka_launch() {
  [[ -n "$(kafka_pid)" ]] && return 0
  if port_open 127.0.0.1 "$KAFKA_PORT"; then
    die "kafka: port $KAFKA_PORT is taken (set KLM_KAFKA_PORT)"
  fi
  ensure_tools kafka
  ensure_classpath
  local java cp
  java="$(java_bin)"
  cp="$(cat "$KAFKA_CP_FILE")"
  mkdir -p "$LOGS" "$RUN"
  [[ "$KAFKA_SECURITY" == none || "$KAFKA_SECURITY" == sasl ]] ||
    die "KLM_KAFKA_SECURITY must be none or sasl, not '$KAFKA_SECURITY'"
  [[ "$KAFKA_SECURITY" == sasl ]] && kafka_secrets
  write_kafka_props
  if [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
    # an id never starts with '-' (the format tool would take it for an option; Kafka's own
    # Uuid.randomUuid() draws again for the same reason)
    [[ -s "$KAFKA_DIR/cluster-id" && "$(cat "$KAFKA_DIR/cluster-id")" != -* ]] || python3 -c \
      'import base64,uuid
while (u := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"): pass
print(u)' >"$KAFKA_DIR/cluster-id"
    note "kafka: formatting storage (security: $KAFKA_SECURITY)"
    local scram=()
    [[ "$KAFKA_SECURITY" == sasl ]] && mapfile -t scram < <(kafka_scram_args)
    "$java" -cp "$cp" -Dlog4j2.configurationFile="$INFRA_DIR/kafka/log4j2.properties" \
      -Dkafka.logs.dir="$LOGS" kafka.tools.StorageTool format \
      -t "$(cat "$KAFKA_DIR/cluster-id")" -c "$KAFKA_PROPS" "${scram[@]}" \
      >>"$LOGS/kafka.out" 2>&1 ||
      die "kafka: storage format failed, see $LOGS/kafka.out"
    echo "$KAFKA_SECURITY" >"$KAFKA_MODE_FILE"
  fi
  kafka_check_mode
  [[ "$KAFKA_SECURITY" == none && "$KAFKA_SECURITY_CHOSEN" == 0 ]] &&
    note "kafka: this cluster was formatted without security (PLAINTEXT, no ACLs);" \
         "'infra/stack.sh reset' and 'make up' give the SASL/ACL default"
  note "kafka: starting"
  # 9>&-: the broker must not inherit the lock (see take_lock)
  # shellcheck disable=SC2086  # KAFKA_HEAP holds several options
  nohup setsid "$java" $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$INFRA_DIR/kafka/log4j2.properties" \
    -Dkafka.logs.dir="$LOGS" \
    -cp "$cp" kafka.Kafka "$KAFKA_PROPS" >>"$LOGS/kafka.out" 2>&1 </dev/null 9>&- &
  echo $! >"$KAFKA_PID"
}

kafka_wait() {
  local pid rc=0
  pid="$(kafka_pid)"
  [[ -n "$pid" ]] || die "kafka: not running, see $LOGS/kafka.log"
  kafka_ready "$KAFKA_START_TIMEOUT" "$pid" || rc=$?
  case $rc in
    0) say "kafka: ready localhost:$KAFKA_PORT (pid $pid)" ;;
    3) die "kafka: the broker refused the admin login, see $LOGS/kafka.log" ;;
    2) rm -f "$KAFKA_PID"; die "kafka: exited during start, see $LOGS/kafka.log" ;;
    *) die "kafka: not ready after ${KAFKA_START_TIMEOUT}s, see $LOGS/kafka.log" ;;
  esac
}

kafka_stop() {
  local pid
  pid="$(kafka_pid)"
  if [[ -n "$pid" ]]; then
    stop_pid "$pid" kafka
    say "kafka: stopped"
  fi
  rm -f "$KAFKA_PID"
}

kafka_status() {
  local pid
  pid="$(kafka_pid)"
  if [[ -n "$pid" ]] && kafka_ready 0; then
    say "kafka: running localhost:$KAFKA_PORT (pid $pid)"
  elif [[ -n "$pid" ]]; then
    say "kafka: starting (pid $pid, not answering yet)"; return 3
  else
    say "kafka: stopped"; return 3
  fi
}

# --------------------------------------------------------------- postgres ---
#
# The server refuses to run as root, so as root every PostgreSQL program runs
# as the `postgres` user (runuser). That user must be able to reach the data
# directory. When $KLM_HOME is not reachable by it (e.g. a checkout under
# /root, mode 700), we do NOT open up the parents; instead the cluster and its
# socket go to /var/tmp/klm-pg-<hash of KLM_HOME> (kept across reboots) and
# $KLM_HOME/pg is a symlink to the cluster there. `reset` removes both.
# The server log still goes to $KLM_HOME/logs/postgres.log: the file is opened
# by this script and handed to the server as its stdout/stderr.

PG_BIN=""
pg_bin() {
  if [[ -z "$PG_BIN" ]]; then
    if [[ -n "${KLM_PG_BIN:-}" ]]; then
      PG_BIN="$KLM_PG_BIN"
    else
      PG_BIN="$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n1)"
      PG_BIN="${PG_BIN%/postgres}"
    fi
    [[ -x "$PG_BIN/pg_ctl" ]] || die "postgres: no server binaries (run: infra/stack.sh install)"
  fi
  echo "$PG_BIN"
}

pg_as() {  # run a PostgreSQL program as the postgres user (when root)
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

PG_FALLBACK="/var/tmp/klm-pg-$(printf '%s' "$KLM_HOME" | sha256sum | cut -c1-12)"

# sets PGDATA_DIR and PG_SOCK (the real paths the server uses)
pg_paths() {
  local link="$KLM_HOME/pg"
  if [[ -L "$link" ]]; then
    PGDATA_DIR="$(readlink "$link")"
    PG_SOCK="$(dirname "$PGDATA_DIR")/run"
  elif [[ -d "$link" ]] || ! is_root; then
    PGDATA_DIR="$link"
    PG_SOCK="$RUN"
  else
    mkdir -p "$KLM_HOME"
    if pg_as test -x "$KLM_HOME"; then
      PGDATA_DIR="$link"
      PG_SOCK="$RUN"
    else
      # a predictable name in a shared folder: refuse one made by someone else
      if [[ -e "$PG_FALLBACK" && ! -O "$PG_FALLBACK" ]]; then
        die "postgres: $PG_FALLBACK exists and is not ours"
      fi
      PGDATA_DIR="$PG_FALLBACK/pg"
      PG_SOCK="$PG_FALLBACK/run"
    fi
  fi
}

# pid of the postmaster of our cluster; removes a stale postmaster.pid (left
# by a crash or a reboot) so that the next start is not refused.
pg_pid() {
  local pidfile="$PGDATA_DIR/postmaster.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(head -n1 "$pidfile" 2>/dev/null || true)"
  if pid_matches "$pid" postgres "$PGDATA_DIR"; then echo "$pid"; return 0; fi
  note "postgres: removing stale postmaster.pid"
  rm -f "$pidfile" "$PG_SOCK/.s.PGSQL.$PG_PORT" "$PG_SOCK/.s.PGSQL.$PG_PORT.lock"
}

pg_init() {
  [[ -f "$PGDATA_DIR/PG_VERSION" ]] && return 0
  note "postgres: initdb $PGDATA_DIR"
  if [[ "$PGDATA_DIR" != "$KLM_HOME/pg" ]]; then
    mkdir -p "$PGDATA_DIR"
    chmod 755 "$(dirname "$PGDATA_DIR")"
    rm -rf "${KLM_HOME:?}/pg"
    ln -s "$PGDATA_DIR" "$KLM_HOME/pg"
  fi
  mkdir -p "$PGDATA_DIR"
  chmod 700 "$PGDATA_DIR"
  is_root && chown postgres:postgres "$PGDATA_DIR"
  # no password yet (TCP logins fail until pg_setup sets it from secrets/,
  # which the postgres user cannot read)
  pg_as "$(pg_bin)/initdb" -D "$PGDATA_DIR" -U postgres \
      -E UTF8 --locale=C.UTF-8 --data-checksums \
      --auth-local=peer --auth-host=scram-sha-256 >>"$LOGS/postgres.log" 2>&1 ||
    die "postgres: initdb failed, see $LOGS/postgres.log"
  echo "include_if_exists = 'klm.conf'" >>"$PGDATA_DIR/postgresql.conf"
  cat >"$PGDATA_DIR/pg_hba.conf" <<'EOF'
# written by infra/stack.sh
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 peer
local   all       all                      scram-sha-256
host    all       all       127.0.0.1/32   scram-sha-256
host    all       all       ::1/128        scram-sha-256
EOF
  is_root && chown postgres:postgres "$PGDATA_DIR/pg_hba.conf"
  return 0
}

write_pg_conf() {
  cat >"$PGDATA_DIR/klm.conf" <<EOF
# written by infra/stack.sh on each start (included from postgresql.conf)
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
max_connections = 200
shared_buffers = 256MB
# durability is part of the product: keep these on, even in development
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = scram-sha-256
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
  is_root && chown postgres:postgres "$PGDATA_DIR/klm.conf"
  return 0
}

pg_psql() {  # superuser psql over the unix socket (peer auth)
  pg_as "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" \
    -U postgres -d postgres "$@"
}

pg_up() {
  pg_paths
  if [[ -n "$(pg_pid)" ]] && "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    say "postgres: ready 127.0.0.1:$PG_PORT (pid $(pg_pid))"
    return 0
  fi
  ensure_tools postgres
  mkdir -p "$LOGS" "$RUN"
  pg_init
  if [[ -z "$(pg_pid)" ]]; then
    port_open 127.0.0.1 "$PG_PORT" && die "postgres: port $PG_PORT is taken (set KLM_PG_PORT)"
    mkdir -p "$PG_SOCK"
    is_root && chown postgres:postgres "$PG_SOCK"
    write_pg_conf
    note "postgres: starting"
    # no -l: the log file is opened here and inherited (see comment above);
    # 9>&-: the server must not inherit the lock (see take_lock)
    pg_as "$(pg_bin)/pg_ctl" start -D "$PGDATA_DIR" -w -t 60 -s \
      >>"$LOGS/postgres.log" 2>&1 </dev/null 9>&- ||
      die "postgres: start failed, see $LOGS/postgres.log"
  fi
  local i
  for ((i = 0; i < 100; i++)); do
    "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.2
  done
  pg_setup
  say "postgres: ready 127.0.0.1:$PG_PORT (pid $(pg_pid))"
}

# keep the superuser password equal to the secret file; create database klm
pg_setup() {
  ensure_secret pg-admin-password
  local pw
  pw="$(cat "$SECRETS/pg-admin-password")"
  printf "ALTER ROLE postgres PASSWORD '%s';\n" "$pw" | pg_psql -f - >/dev/null
  if [[ "$(pg_psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'klm'")" != 1 ]]; then
    pg_psql -c "CREATE DATABASE klm" >/dev/null
  fi
}

pg_stop() {
  pg_paths
  local pid
  pid="$(pg_pid)"
  if [[ -n "$pid" ]]; then
    mkdir -p "$LOGS"
    pg_as "$(pg_bin)/pg_ctl" stop -D "$PGDATA_DIR" -m fast -w -t "$STOP_TIMEOUT" -s \
      >>"$LOGS/postgres.log" 2>&1 || stop_pid "$pid" postgres
    say "postgres: stopped"
  fi
}

pg_status() {
  pg_paths
  local pid
  pid="$(pg_pid)"
  if [[ -n "$pid" ]] && "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    say "postgres: running 127.0.0.1:$PG_PORT (pid $pid)"
  elif [[ -n "$pid" ]]; then
    say "postgres: starting (pid $pid, not answering yet)"; return 3
  else
    say "postgres: stopped"; return 3
  fi
}

# -------------------------------------------------------------------- hsm ---

HSM_MODULE=""
hsm_module() {
  if [[ -z "$HSM_MODULE" ]]; then
    local m
    # /usr/lib/softhsm/ is Debian's arch-independent link to the library
    for m in "${KLM_HSM_MODULE:-}" /usr/lib/softhsm/libsofthsm2.so \
             $(dpkg -L libsofthsm2 softhsm2 2>/dev/null | grep '/libsofthsm2\.so$' || true) \
             /usr/local/lib/softhsm/libsofthsm2.so; do
      [[ -n "$m" && -f "$m" ]] && { HSM_MODULE="$m"; break; }
    done
  fi
  echo "${HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
}

hsm_write_conf() {
  mkdir -p "$HSM_DIR/tokens"
  chmod 700 "$HSM_DIR/tokens"
  cat >"$HSM_CONF.tmp" <<EOF
# written by infra/stack.sh
directories.tokendir = $HSM_DIR/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
  mv "$HSM_CONF.tmp" "$HSM_CONF"
}

hsm_slot() {  # slot number of our token, empty when absent
  [[ -f "$HSM_CONF" ]] && command -v softhsm2-util >/dev/null || return 0
  SOFTHSM2_CONF="$HSM_CONF" softhsm2-util --show-slots 2>/dev/null | awk -v label="$HSM_LABEL" '
    /^Slot [0-9]+/ { slot = $2 }
    /^ *Label:/ { sub(/^ *Label: */, ""); sub(/ *$/, ""); if ($0 == label && !found) { found = slot } }
    END { if (found != "") print found }'  # read to the end: an early exit SIGPIPEs softhsm2-util (pipefail)
}

hsm_up() {
  ensure_tools hsm
  hsm_write_conf
  ensure_secret hsm-pin 16
  ensure_secret hsm-so-pin 16
  if [[ -z "$(hsm_slot)" ]]; then
    note "hsm: init token '$HSM_LABEL'"
    SOFTHSM2_CONF="$HSM_CONF" softhsm2-util --init-token --free --label "$HSM_LABEL" \
      --pin "$(cat "$SECRETS/hsm-pin")" --so-pin "$(cat "$SECRETS/hsm-so-pin")" >/dev/null ||
      die "hsm: token init failed"
  fi
  local slot
  slot="$(hsm_slot)"
  [[ -n "$slot" ]] || die "hsm: token '$HSM_LABEL' not listed by softhsm2-util"
  say "hsm: ready token '$HSM_LABEL' (slot $slot)"
}

hsm_status() {
  local slot
  slot="$(hsm_slot)"
  if [[ -n "$slot" ]]; then
    say "hsm: running token '$HSM_LABEL' (slot $slot, in-process library)"
  else
    say "hsm: stopped (no token '$HSM_LABEL')"; return 3
  fi
}

# --------------------------------------------------------------- commands ---

components() {  # validate and default the component list
  local c
  (($#)) || set -- kafka postgres hsm
  for c in "$@"; do
    case "$c" in kafka | postgres | hsm) echo "$c" ;; *) die "unknown component: $c" ;; esac
  done
}

cmd_up() {
  local comps
  comps="$(components "$@" | tr '\n' ' ')"
  # Kafka's JVM boots slowly: launch it first, bring up the rest meanwhile.
  [[ " $comps" == *" kafka "* ]] && kafka_launch
  [[ " $comps" == *" postgres "* ]] && pg_up
  [[ " $comps" == *" hsm "* ]] && hsm_up
  if [[ " $comps" == *" kafka "* ]]; then
    kafka_wait
    [[ "$KAFKA_SECURITY" == sasl ]] && kafka_apply_security ""
  fi
  return 0
}

cmd_down() {  # default: Kafka and Postgres (hsm is a library: nothing to stop)
  local comps
  comps="$(components "$@" | tr '\n' ' ')"
  [[ " $comps" == *" kafka "* ]] && kafka_stop
  [[ " $comps" == *" postgres "* ]] && pg_stop
  return 0
}

cmd_status() {
  local c rc=0
  for c in $(components "$@"); do
    case "$c" in
      kafka) kafka_status || rc=3 ;;
      postgres) pg_status || rc=3 ;;
      hsm) hsm_status || rc=3 ;;
    esac
  done
  return $rc
}

cmd_env() {
  ensure_secret pg-admin-password
  ensure_secret hsm-pin 16
  ensure_secret hsm-so-pin 16
  local pw
  pw="$(cat "$SECRETS/pg-admin-password")"
  cat <<EOF
export KLM_HOME='$KLM_HOME'
export KLM_KAFKA_BOOTSTRAP='localhost:$KAFKA_PORT'
export KLM_PG_DSN='postgresql://127.0.0.1:$PG_PORT/klm'
export KLM_PG_ADMIN_DSN='postgresql://postgres:$pw@127.0.0.1:$PG_PORT/klm'
export SOFTHSM2_CONF='$HSM_CONF'
export KLM_HSM_MODULE='$(hsm_module)'
export KLM_HSM_TOKEN_LABEL='$HSM_LABEL'
export KLM_HSM_PIN_FILE='$SECRETS/hsm-pin'
export KLM_HSM_SO_PIN_FILE='$SECRETS/hsm-so-pin'
EOF
  # secured Kafka: clients log in as admin unless KLM_KAFKA_USERNAME names another user;
  # passwords are read from secrets/kafka-<user>-password (KlmSettings.kafka_password_value)
  [[ "$KAFKA_SECURITY" == sasl ]] && echo "export KLM_KAFKA_SECURITY='sasl'"
  return 0
}

cmd_kafka_tenant() {
  local name="${1:-}"
  [[ -n "$name" ]] || die "usage: infra/stack.sh kafka-tenant NAME"
  python3 "$INFRA_DIR/kafka/acl_plan.py" --tenant "$name" >/dev/null ||
    die "kafka: invalid tenant name '$name'"
  mkdir -p "$KAFKA_DIR"
  grep -qxF "$name" "$KAFKA_TENANTS_FILE" 2>/dev/null || echo "$name" >>"$KAFKA_TENANTS_FILE"
  kafka_apply_security "${KLM_TOPIC_PREFIX:-}"
  say "kafka: tenant '$name' may write ${KLM_TOPIC_PREFIX:-}klm.requests.$name" \
      "(password: $SECRETS/kafka-$name-password)"
}

cmd_reset() {
  cmd_down
  pg_paths
  if [[ "$PGDATA_DIR" == "$PG_FALLBACK/pg" ]]; then rm -rf "$PG_FALLBACK"; fi
  # keep the lock and the resolved Kafka classpath (a cache, not data)
  find "$KLM_HOME" -mindepth 1 -maxdepth 1 ! -name kafka ! -name stack.lock -exec rm -rf {} +
  if [[ -d "$KAFKA_DIR" ]]; then
    find "$KAFKA_DIR" -mindepth 1 -maxdepth 1 ! -name classpath.txt \
      ! -name classpath.pom.sha256 -exec rm -rf {} +
  fi
  say "reset: $KLM_HOME cleared"
}

# one mutating command at a time per KLM_HOME (e.g. `make -j`, two terminals)
take_lock() {
  exec 9>"$KLM_HOME/stack.lock"
  flock -w 300 9 || die "another infra/stack.sh is still running"
}

usage() {
  sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
  local cmd="${1:-}"
  (($#)) && shift
  case "$cmd" in
    install | up | down | reset | kafka-acls | kafka-drop-acls | kafka-tenant) take_lock ;;
  esac
  case "$cmd" in
    install) cmd_install ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    env) cmd_env ;;
    reset) cmd_reset ;;
    kafka-acls) mkdir -p "$LOGS"; kafka_apply_security "${1:-}" ;;
    kafka-drop-acls) mkdir -p "$LOGS"; kafka_drop_acls "${1:-}" ;;
    kafka-tenant) mkdir -p "$LOGS"; cmd_kafka_tenant "$@" ;;
    kafka-list-acls) kafka_admin list-acls ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
