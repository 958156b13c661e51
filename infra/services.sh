#!/usr/bin/env bash
# Start, stop and check the four KLM services of the local stack.
#
#   infra/services.sh start     start the services that are not running, wait until ready
#   infra/services.sh stop      SIGTERM (graceful), then SIGKILL after a timeout
#   infra/services.sh status    one line per service with its /readyz answer
#
# Each runs from the project's virtualenv with the stack's environment
# (infra/stack.sh env); logs in $KLM_HOME/logs/<service>.log, pids in $KLM_HOME/run.
set -euo pipefail

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(dirname "$INFRA_DIR")"
eval "$("$INFRA_DIR/stack.sh" env)"
VENV_BIN="$REPO_DIR/.venv/bin"
SERVICES=(keygen rotation backup audit)
declare -A PORTS=([audit]="${KLM_AUDIT_PORT:-8700}" [keygen]="${KLM_KEYGEN_PORT:-8701}"
                  [rotation]="${KLM_ROTATION_PORT:-8702}" [backup]="${KLM_BACKUP_PORT:-8703}")
READY_TIMEOUT="${KLM_READY_TIMEOUT:-90}"

pid_of() { local f="$KLM_HOME/run/$1.pid"; [[ -f $f ]] && cat "$f" || true; }
alive() { local p; p=$(pid_of "$1"); [[ -n $p ]] && kill -0 "$p" 2>/dev/null; }
ready() { curl -fsS -m 3 "http://127.0.0.1:${PORTS[$1]}/readyz" >/dev/null 2>&1; }

start() {
  mkdir -p "$KLM_HOME/logs" "$KLM_HOME/run"
  for s in "${SERVICES[@]}"; do
    if alive "$s"; then continue; fi
    # setsid: the service outlives the make process that started it
    # KLM_KAFKA_USERNAME: on the secured stack each service logs in as its own principal
    # (its ACLs: infra/kafka/acl_plan.py), start-up included
    KLM_KAFKA_USERNAME="$s" setsid nohup "$VENV_BIN/klm-$s" \
      >>"$KLM_HOME/logs/$s.log" 2>&1 </dev/null &
    echo $! >"$KLM_HOME/run/$s.pid"
  done
  local deadline=$((SECONDS + READY_TIMEOUT))
  for s in "${SERVICES[@]}"; do
    until ready "$s"; do
      if ! alive "$s"; then
        echo "$s: exited; last log lines:" >&2; tail -n 20 "$KLM_HOME/logs/$s.log" >&2; exit 1
      fi
      if (( SECONDS > deadline )); then
        echo "$s: not ready after ${READY_TIMEOUT}s; see $KLM_HOME/logs/$s.log" >&2; exit 1
      fi
      sleep 0.5
    done
    echo "$s: ready (http://127.0.0.1:${PORTS[$s]})"
  done
}

stop() {
  for s in "${SERVICES[@]}"; do
    local p; p=$(pid_of "$s")
    if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p"
      for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$p" 2>/dev/null && kill -KILL "$p"
      echo "$s: stopped"
    fi
    rm -f "$KLM_HOME/run/$s.pid"
  done
}

status() {
  for s in "${SERVICES[@]}"; do
    if ready "$s"; then echo "$s: ready"; elif alive "$s"; then echo "$s: running, not ready";
    else echo "$s: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
