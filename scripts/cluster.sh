#!/usr/bin/env bash
# A local three-node RabbitMQ cluster on this machine, beside the usual node (which it never touches):
# three nodes with their own names, ports and data, joined into one cluster, with the partition
# handling RabbitMQ's clustering guide recommends for three nodes (pause_minority).
#
#   scripts/cluster.sh up        # start the three nodes (fresh), join them, print the variables to export
#   scripts/cluster.sh env       # print them only:  eval "$(scripts/cluster.sh env)"
#   scripts/cluster.sh status    # each node: running or not, and the cluster as node 1 sees it
#   scripts/cluster.sh down      # stop the nodes and remove everything `up` made
#
# For fault tests (N is 1, 2 or 3):
#   scripts/cluster.sh kill N    # kill -9 node N's Erlang VM
#   scripts/cluster.sh stop N    # stop node N gracefully
#   scripts/cluster.sh start N   # start node N again, with its data (it rejoins the cluster)
#   scripts/cluster.sh isolate N # cut node N's distribution links to the other two (a partition)
#   scripts/cluster.sh heal N    # restore them
#
# Settings (environment): MAILROOM_CLUSTER_BASE_PORT (5680: node N gets AMQP BASE+N, management
# 10000+BASE+N, distribution 20000+BASE+N), MAILROOM_CLUSTER_DIR (/tmp/mailroom-cluster: config,
# data, logs, pid files), MAILROOM_CLUSTER_PREFIX (mailroom: nodes mailroom1@localhost ...).
#
# The partition: this machine has neither iptables nor nft, so `isolate` cuts the Erlang
# distribution links themselves: node N is given a wrong cookie for its two peers (every
# handshake between them then fails, both ways) and its existing links are dropped. Clients and
# rabbitmqctl still reach node N, which pause_minority then pauses; `heal` gives the right cookie
# back, and the paused node rejoins by itself.
set -euo pipefail

BASE="${MAILROOM_CLUSTER_BASE_PORT:-5680}"
DIR="${MAILROOM_CLUSTER_DIR:-/tmp/mailroom-cluster}"
PREFIX="${MAILROOM_CLUSTER_PREFIX:-mailroom}"
NODES=(1 2 3)

say() { printf '%s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
node() { echo "${PREFIX}$1@localhost"; }
amqp_port() { echo $((BASE + $1)); }
management_port() { echo $((10000 + BASE + $1)); }
dist_port() { echo $((20000 + BASE + $1)); }
ctl() { local n="$1"; shift; timeout 120 rabbitmqctl -q -n "$(node "$n")" "$@"; }
running() { timeout 30 rabbitmqctl -q -n "$(node "$1")" eval 'ok.' >/dev/null 2>&1; }
check_node() { [[ "$1" =~ ^[123]$ ]] || { say "usage: $0 ${2:-kill} 1|2|3"; exit 2; }; }

print_env() {
  local urls=() n
  for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2F"); done
  printf "export RABBITMQ_URL='%s'\n" "$(IFS=,; echo "${urls[*]}")"
  printf "export RABBITMQ_MANAGEMENT_URL='%s'\n" "http://guest:guest@127.0.0.1:$(management_port 1)/"
  printf "export RABBITMQ_NODENAME='%s'\n" "$(node 1)"
}

write_config() {
  local n="$1" d="$DIR/$(node "$1")"
  mkdir -p "$d/mnesia" "$d/log"
  cat > "$d/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(management_port "$n")
cluster_partition_handling = pause_minority
EOF
  echo '[rabbitmq_management].' > "$d/enabled_plugins"
  # Variables for this node only: the machine's rabbitmq-env.conf names the usual node.
  cat > "$d/rabbitmq-env.conf" <<EOF
NODENAME=$(node "$n")
NODE_PORT=$(amqp_port "$n")
DIST_PORT=$(dist_port "$n")
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
}

start_node() {
  local n="$1" d="$DIR/$(node "$1")"
  [[ -f "$d/rabbitmq.conf" ]] || { say "$(node "$n") was never set up: run $0 up"; exit 1; }
  local pid
  pid="$(cat "$d/pid" 2>/dev/null || true)"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then say "$(node "$n") is already running."; return 0; fi
  # On Debian, root's rabbitmq-server runs as the rabbitmq user: it must own its directory.
  if [[ $(id -u) == 0 ]] && id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq: "$DIR"; fi
  RABBITMQ_NODENAME="$(node "$n")" RABBITMQ_NODE_PORT="$(amqp_port "$n")" RABBITMQ_DIST_PORT="$(dist_port "$n")" \
  RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" RABBITMQ_CONFIG_FILE="$d/rabbitmq" \
  RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/pid" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    rabbitmq-server -detached
}

await_node() {
  local n="$1"
  # -detached returns before the node is reachable: await_startup fails at once until it is.
  for _ in $(seq 1 90); do
    if timeout 120 rabbitmqctl -q -n "$(node "$n")" await_startup >/dev/null 2>&1; then
      for _ in $(seq 1 60); do
        port_open 127.0.0.1 "$(amqp_port "$n")" && return 0
        sleep 0.5
      done
    fi
    sleep 1
  done
  say "$(node "$n") did not start (see $DIR/$(node "$n")/log)."
  exit 1
}

up() {
  command -v rabbitmq-server >/dev/null || { say "rabbitmq-server is not installed (apt-get install -y rabbitmq-server)."; exit 1; }
  local n
  if running 1 && running 2 && running 3; then
    say "The cluster is already running."
    print_env
    return 0
  fi
  for n in "${NODES[@]}"; do
    for port in "$(amqp_port "$n")" "$(management_port "$n")" "$(dist_port "$n")"; do
      if port_open 127.0.0.1 "$port"; then say "Port $port is taken: set MAILROOM_CLUSTER_BASE_PORT (see the top of $0)."; exit 1; fi
    done
  done
  rm -rf "$DIR"
  for n in "${NODES[@]}"; do write_config "$n"; done
  say "Starting $(node 1), $(node 2), $(node 3) (AMQP 127.0.0.1:$(amqp_port 1)-$(amqp_port 3)) in $DIR ..."
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in 2 3; do
    ctl "$n" stop_app >/dev/null
    ctl "$n" join_cluster "$(node 1)" >/dev/null
    ctl "$n" start_app >/dev/null
  done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for _ in $(seq 1 60); do
    port_open 127.0.0.1 "$(management_port 1)" && break
    sleep 0.5
  done
  say "The cluster is up. For the tests and the app:"
  print_env
}

down() {
  local n pid
  for n in "${NODES[@]}"; do
    (if running "$n"; then ctl "$n" stop >/dev/null 2>&1 || true; fi) &
  done
  wait
  for n in "${NODES[@]}"; do
    pid="$(cat "$DIR/$(node "$n")/pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$DIR"
  say "The cluster is down; $DIR removed."
}

status() {
  local n code=0
  for n in "${NODES[@]}"; do
    if running "$n"; then say "$(node "$n"): running (AMQP 127.0.0.1:$(amqp_port "$n"), management :$(management_port "$n"))"
    else say "$(node "$n"): not running"; code=1; fi
  done
  if running 1; then ctl 1 cluster_status >&2 || true; fi
  return "$code"
}

kill_node() {
  local pid
  pid="$(cat "$DIR/$(node "$1")/pid" 2>/dev/null || true)"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || { say "$(node "$1") is not running."; exit 1; }
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  say "$(node "$1") killed (-9, pid $pid)."
}

peers() {
  local n list=()
  for n in "${NODES[@]}"; do [[ $n == "$1" ]] || list+=("'$(node "$n")'"); done
  (IFS=,; echo "${list[*]}")
}

isolate() {
  # A cookie that matches nobody's for its peers, then its links to them dropped.
  ctl "$1" eval "[begin erlang:set_cookie(P, 'mailroom_partition'), erlang:disconnect_node(P) end || P <- [$(peers "$1")]], ok." >/dev/null
  say "$(node "$1") isolated from $(peers "$1")."
}

heal() {
  ctl "$1" eval "[begin erlang:set_cookie(P, erlang:get_cookie()), net_adm:ping(P) end || P <- [$(peers "$1")]], ok." >/dev/null
  say "$(node "$1") healed."
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) print_env ;;
  kill) check_node "${2:-}" kill; kill_node "$2" ;;
  stop) check_node "${2:-}" stop; ctl "$2" stop >/dev/null; say "$(node "$2") stopped." ;;
  start) check_node "${2:-}" start; start_node "$2"; await_node "$2"; say "$(node "$2") started." ;;
  isolate) check_node "${2:-}" isolate; isolate "$2" ;;
  heal) check_node "${2:-}" heal; heal "$2" ;;
  *) say "usage: $0 up|down|status|env, or kill|stop|start|isolate|heal 1|2|3"; exit 2 ;;
esac
