#!/usr/bin/env bash
# Make sure the services Mailroom needs answer; start local ones that are installed but stopped.
#   scripts/services.sh rabbitmq [management] [postgres] [chromium]
# Exits non-zero, saying what to do, when a service cannot be had.
# Where: RABBITMQ_URL (the broker), RABBITMQ_MANAGEMENT_URL (its management API, default
# http://guest:guest@127.0.0.1:15672/), RABBITMQ_NODENAME (the node rabbitmqctl talks to), from the
# environment, else from .env.
set -uo pipefail

say() { printf '%s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Each variable from the environment, else from .env (as Django and honcho read it), else its default.
for name in RABBITMQ_URL RABBITMQ_MANAGEMENT_URL RABBITMQ_NODENAME; do
  if [[ -z "${!name:-}" && -f .env ]]; then
    value="$(sed -n "s/^[[:space:]]*${name}[[:space:]]*=[[:space:]]*//p" .env | tail -n1 | tr -d '"'"'"'')"
    [[ -n "$value" ]] && printf -v "$name" '%s' "$value" && export "${name?}"
  fi
done

# rabbitmqctl and rabbitmq-plugins talk to the node RABBITMQ_NODENAME names, when it is set.
# (rabbitmq-plugins writes the file RABBITMQ_ENABLED_PLUGINS_FILE names, else the machine's, then tells the node.)
NODE_ARGS=()
[[ -n "${RABBITMQ_NODENAME:-}" ]] && NODE_ARGS=(-n "$RABBITMQ_NODENAME")

is_local() { [[ "$1" == "localhost" || "$1" == "127.0.0.1" || "$1" == "::1" ]]; }

# host and port of the first address in RABBITMQ_URL (default localhost:5672)
rabbit_host_port() {
  local url="${RABBITMQ_URL:-amqp://guest:guest@localhost:5672/%2F}"
  url="${url%%,*}"; url="${url#*://}"; url="${url#*@}"; url="${url%%/*}"
  local host="${url%%:*}" port="5672"
  [[ "$url" == *:* ]] && port="${url##*:}"
  echo "$host $port"
}

ensure_rabbitmq() {
  read -r host port < <(rabbit_host_port)
  if port_open "$host" "$port"; then return 0; fi
  if ! is_local "$host"; then
    say "RabbitMQ does not answer at $host:$port (RABBITMQ_URL). Start it there, or unset RABBITMQ_URL to use a local one."
    return 1
  fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [[ "${CI:-}" == "true" || "${MAILROOM_INSTALL_SERVICES:-}" == "1" ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      say "Installing rabbitmq-server (apt-get) ..."
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null || return 1
    else
      say "RabbitMQ is not installed. Install it: sudo apt-get install -y rabbitmq-server"
      say "(or point RABBITMQ_URL at a running broker). Re-run with MAILROOM_INSTALL_SERVICES=1 as root to let this script install it."
      return 1
    fi
  fi
  if timeout 20 rabbitmqctl "${NODE_ARGS[@]}" -q status >/dev/null 2>&1; then
    say "A local RabbitMQ node is running, but nothing answers at $host:$port: check the port in RABBITMQ_URL."
    return 1
  fi
  say "Starting rabbitmq-server ..."
  rabbitmq-server -detached >/dev/null 2>&1 || true
  # -detached returns before the node can be reached: await_startup fails at once until it can.
  local started=""
  for _ in $(seq 1 30); do
    if timeout 120 rabbitmqctl "${NODE_ARGS[@]}" -q await_startup >/dev/null 2>&1; then started=1; break; fi
    sleep 2
  done
  [[ -n "$started" ]] || { say "RabbitMQ did not start (see /var/log/rabbitmq)."; return 1; }
  port_open "$host" "$port" || { say "RabbitMQ started but $host:$port does not answer."; return 1; }
}

# host and port of RABBITMQ_MANAGEMENT_URL (default 127.0.0.1:15672)
management_host_port() {
  local url="${RABBITMQ_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672/}"
  local scheme="${url%%://*}"
  url="${url#*://}"; url="${url%%/*}"; url="${url##*@}"
  local host="$url" port
  if [[ "$url" == \[* ]]; then  # [IPv6]:port
    host="${url%%]*}"; host="${host#[}"; port="${url##*]}"; port="${port#:}"
  elif [[ "$url" == *:* ]]; then
    host="${url%%:*}"; port="${url##*:}"
  fi
  if [[ -z "${port:-}" ]]; then [[ "$scheme" == https ]] && port=443 || port=80; fi
  echo "$host $port"
}

ensure_management() {
  # The management HTTP API (queue depths, rates, bindings) where RABBITMQ_MANAGEMENT_URL says.
  read -r host port < <(management_host_port)
  port_open "$host" "$port" && return 0
  if ! is_local "$host"; then
    say "The RabbitMQ management API does not answer at $host:$port (RABBITMQ_MANAGEMENT_URL)."
    return 1
  fi
  command -v rabbitmq-plugins >/dev/null 2>&1 || return 0
  rabbitmq-plugins "${NODE_ARGS[@]}" enable rabbitmq_management >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do port_open "$host" "$port" && return 0; sleep 1; done
  say "The RabbitMQ management plugin did not come up on $host:$port (RABBITMQ_MANAGEMENT_URL)."
  return 1
}

ensure_postgres() {
  if port_open 127.0.0.1 5432; then return 0; fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]]; then
    say "Starting PostgreSQL ..."
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do port_open 127.0.0.1 5432 && return 0; sleep 1; done
  fi
  say "PostgreSQL does not answer on 127.0.0.1:5432. Install it: sudo apt-get install -y postgresql"
  return 1
}

ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "Installing Debian's chromium for the browser tests (apt-get) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && return 0
  fi
  say "The browser tests need Debian's chromium: sudo apt-get install -y chromium"
  return 1
}

status=0
for service in "$@"; do
  case "$service" in
    rabbitmq) ensure_rabbitmq || status=1 ;;
    management) ensure_management || status=1 ;;
    postgres) ensure_postgres || status=1 ;;
    chromium) ensure_chromium || status=1 ;;
    *) say "unknown service: $service"; status=2 ;;
  esac
done
exit $status
