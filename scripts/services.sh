#!/usr/bin/env bash
# Make sure the services Mailroom needs answer; start local ones that are installed but stopped.
#   scripts/services.sh rabbitmq [postgres] [chromium]
# Exits non-zero, saying what to do, when a service cannot be had.
set -uo pipefail

say() { printf '%s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# RABBITMQ_URL from the environment, else from .env (as Django and honcho read it), else the default.
if [[ -z "${RABBITMQ_URL:-}" && -f .env ]]; then
  RABBITMQ_URL="$(sed -n 's/^[[:space:]]*RABBITMQ_URL[[:space:]]*=[[:space:]]*//p' .env | tail -n1 | tr -d '"'"'"'')"
fi

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
  if [[ "$host" != "localhost" && "$host" != "127.0.0.1" ]]; then
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
  if timeout 20 rabbitmqctl -q status >/dev/null 2>&1; then
    say "A local RabbitMQ node is running, but nothing answers at $host:$port: check the port in RABBITMQ_URL."
    return 1
  fi
  say "Starting rabbitmq-server ..."
  rabbitmq-server -detached >/dev/null 2>&1 || true
  timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || { say "RabbitMQ did not start (see /var/log/rabbitmq)."; return 1; }
  port_open "$host" "$port" || { say "RabbitMQ started but $host:$port does not answer."; return 1; }
}

ensure_management() {
  # The management HTTP API (queue depths, rates, bindings) on 127.0.0.1:15672.
  port_open 127.0.0.1 15672 && return 0
  command -v rabbitmq-plugins >/dev/null 2>&1 || return 0
  rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do port_open 127.0.0.1 15672 && return 0; sleep 1; done
  say "The RabbitMQ management plugin did not come up on 127.0.0.1:15672."
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
