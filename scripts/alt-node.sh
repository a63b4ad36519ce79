#!/usr/bin/env bash
# A throwaway RabbitMQ node beside the usual one, on other ports: to check that the tests and the
# scripts take the broker from the environment (RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL,
# RABBITMQ_NODENAME) and never from 5672/15672 written somewhere.
#
#   scripts/alt-node.sh start    # start it (fresh: its data is wiped), then print the variables to export
#   scripts/alt-node.sh env      # print them only:  eval "$(scripts/alt-node.sh env)"
#   scripts/alt-node.sh stop     # stop it
#
# e.g.  scripts/alt-node.sh start && eval "$(scripts/alt-node.sh env)" &&
#       DATABASE_URL=sqlite:///$PWD/alt.sqlite3 .venv/bin/python -m pytest tests/test_queues_view.py
#       scripts/alt-node.sh stop
#
# Settings (environment): ALT_NODENAME (mailroom-alt@localhost), ALT_AMQP_PORT (5673),
# ALT_MANAGEMENT_PORT (15673), ALT_DIST_PORT (25673), ALT_DIR (/tmp/mailroom-alt: config, data, logs),
# ALT_EXTRA_CONF (more rabbitmq.conf lines, e.g. 'collect_statistics_interval = 1000').
# Needs rabbitmq-server installed locally; the guest user logs in from localhost only, as here.
set -euo pipefail

NODE="${ALT_NODENAME:-mailroom-alt@localhost}"
AMQP_PORT="${ALT_AMQP_PORT:-5673}"
MANAGEMENT_PORT="${ALT_MANAGEMENT_PORT:-15673}"
DIST_PORT="${ALT_DIST_PORT:-25673}"
DIR="${ALT_DIR:-/tmp/mailroom-alt}"

say() { printf '%s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
ctl() { rabbitmqctl -n "$NODE" "$@"; }

print_env() {
  printf 'export RABBITMQ_URL=%q\n' "amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2F"
  printf 'export RABBITMQ_MANAGEMENT_URL=%q\n' "http://guest:guest@127.0.0.1:${MANAGEMENT_PORT}/"
  printf 'export RABBITMQ_NODENAME=%q\n' "$NODE"
  # rabbitmq-plugins -n NODE writes the plugins file it knows of (else the machine's) before telling the node.
  printf 'export RABBITMQ_ENABLED_PLUGINS_FILE=%q\n' "$DIR/enabled_plugins"
}

start() {
  command -v rabbitmq-server >/dev/null || { say "rabbitmq-server is not installed (apt-get install -y rabbitmq-server)."; exit 1; }
  if timeout 30 rabbitmqctl -q -n "$NODE" status >/dev/null 2>&1; then
    say "$NODE is already running."
    print_env
    return 0
  fi
  for port in "$AMQP_PORT" "$MANAGEMENT_PORT" "$DIST_PORT"; do
    if port_open 127.0.0.1 "$port"; then say "Port $port is taken: set ALT_*_PORT (see the top of $0)."; exit 1; fi
  done
  rm -rf "$DIR/mnesia"
  mkdir -p "$DIR/mnesia" "$DIR/log"
  cat > "$DIR/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:${AMQP_PORT}
management.tcp.ip = 127.0.0.1
management.tcp.port = ${MANAGEMENT_PORT}
${ALT_EXTRA_CONF:-}
EOF
  echo '[rabbitmq_management].' > "$DIR/enabled_plugins"
  # Variables for this node only (the machine's rabbitmq-env.conf names the usual node); its
  # inter-node port on the loopback interface only.
  cat > "$DIR/rabbitmq-env.conf" <<EOF
NODENAME=${NODE}
NODE_PORT=${AMQP_PORT}
DIST_PORT=${DIST_PORT}
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  # On Debian, root's rabbitmq-server runs as the rabbitmq user: it must own its directory.
  if [[ $(id -u) == 0 ]] && id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq: "$DIR"; fi

  say "Starting $NODE (AMQP 127.0.0.1:$AMQP_PORT, management 127.0.0.1:$MANAGEMENT_PORT) in $DIR ..."
  RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
  RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" RABBITMQ_CONFIG_FILE="$DIR/rabbitmq" \
  RABBITMQ_MNESIA_BASE="$DIR/mnesia" RABBITMQ_LOG_BASE="$DIR/log" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
    rabbitmq-server -detached
  # -detached returns before the node is reachable: await_startup fails at once until it is.
  local started=""
  for _ in $(seq 1 60); do
    if timeout 120 rabbitmqctl -q -n "$NODE" await_startup >/dev/null 2>&1; then started=1; break; fi
    sleep 2
  done
  [[ -n "$started" ]] || { say "$NODE did not start (see $DIR/log)."; exit 1; }
  for _ in $(seq 1 60); do
    if port_open 127.0.0.1 "$AMQP_PORT" && port_open 127.0.0.1 "$MANAGEMENT_PORT"; then
      say "$NODE is up. For the tests:"
      print_env
      return 0
    fi
    sleep 1
  done
  say "$NODE started, but 127.0.0.1:$AMQP_PORT or :$MANAGEMENT_PORT does not answer (see $DIR/log)."
  exit 1
}

stop() {
  if ! timeout 30 rabbitmqctl -q -n "$NODE" status >/dev/null 2>&1; then
    say "$NODE is not running."
    return 0
  fi
  ctl stop >/dev/null
  say "$NODE stopped."
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  *) say "usage: $0 start|stop|env"; exit 2 ;;
esac
