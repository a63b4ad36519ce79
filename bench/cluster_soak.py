"""Soak: letters through a three-node RabbitMQ cluster, outbox → relays → quorum queue → workers →
PostgreSQL, with one node killed -9 in the middle (and started again). Run by hand:

    .venv/bin/python bench/cluster_soak.py                      # 1,000,000 letters, 4 workers, 2 relays
    .venv/bin/python bench/cluster_soak.py --messages 200000    # a shorter run

It starts its own cluster (scripts/cluster.sh with MAILROOM_CLUSTER_BASE_PORT, default 5700 here, in
/tmp/mailroom-cluster-soak) and removes it afterwards; it recreates the PostgreSQL database of
SOAK_DATABASE_URL (postgres://postgres@127.0.0.1:5432/mailroom_soak) and migrates it.

The outbox is fed as fast as the pipeline drains it, keeping at most --window letters written but
not yet recorded. Prints: throughput (letters recorded per second, first write to last record),
p50/p99 from a letter's outbox row committed to its delivery row committed (seen by a poller every
100 ms: the time through the relay, the broker and the worker, the relay's polling included), each
worker's RSS after the first 10,000 letters and at the end, letters lost (not recorded as an acked
delivery: must be 0) and duplicates recorded as deliveries.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/mailroom_soak"
QUEUE = "soak"
POLL_SECONDS = 0.1
# Rows committed out of id order (four workers' batches of 500 in flight at once) are caught by looking back this far.
LOOK_BACK = 2500


def sh(*command: str, env: dict | None = None, timeout: float = 600) -> str:
    out = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{' '.join(command)} failed: {out.stderr}")
    return out.stdout


def recreate_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0].replace("postgres://", "postgresql://", 1) + "/postgres"
    with psycopg.connect(admin, autocommit=True) as pg:
        pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        pg.execute(f'CREATE DATABASE "{name}"')


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class Soak:
    """The feeder and the poller of one run, and what they measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.written_at: list[float] = []  # by letter index: when its outbox row was committed
        self.latencies: list[float] = []
        self.seen = 0
        self.first_write = self.last_seen = 0.0
        self.done = threading.Event()

    def feed(self) -> None:
        """Write pending letters in chunks while fewer than --window are unrecorded."""
        from django.db import connection
        from django.utils import timezone

        from messaging.models import Message

        total, chunk = self.args.messages, self.args.chunk
        body = b"x" * 200
        try:
            while len(self.written_at) < total and not self.done.is_set():
                if len(self.written_at) - self.seen >= self.args.window:
                    time.sleep(0.01)
                    continue
                start, now = len(self.written_at), timezone.now()
                letters = []
                for i in range(start, min(total, start + chunk)):
                    letter = Message(message_id=f"soak-{i}", routing_key=QUEUE, status=Message.Status.PENDING,
                                     next_attempt_at=now, origin=Message.Origin.API)
                    letter.set_body(body)
                    letters.append(letter)
                Message.objects.bulk_create(letters)
                committed = time.monotonic()
                self.first_write = self.first_write or committed
                self.written_at.extend([committed] * len(letters))
        finally:
            connection.close()

    def poll(self) -> None:
        """Stamp each letter's first delivery row when it becomes visible (committed)."""
        from django.db import connection

        stamped: set[int] = set()
        last = 0
        try:
            while not self.done.is_set():
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT d.id, m.message_id FROM messaging_delivery d JOIN messaging_message m ON m.id = d.message_id "
                        "WHERE d.id > %s AND d.status = 'acked' AND NOT d.duplicate ORDER BY d.id", [max(0, last - LOOK_BACK)])
                    rows = cursor.fetchall()
                now = time.monotonic()
                for pk, message_id in rows:
                    index = int(message_id.rsplit("-", 1)[1])
                    last = max(last, pk)
                    if index in stamped:  # seen already (or a copy two workers recorded at once)
                        continue
                    stamped.add(index)
                    self.latencies.append(now - self.written_at[index])
                    self.seen += 1
                    self.last_seen = now
                if self.seen >= self.args.messages:
                    return
                time.sleep(POLL_SECONDS)
        finally:
            connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--relays", type=int, default=2)
    parser.add_argument("--window", type=int, default=20_000, help="letters written but not yet recorded, at most")
    parser.add_argument("--chunk", type=int, default=2000, help="letters per outbox insert")
    parser.add_argument("--kill-node", type=int, default=1, help="the node killed -9 halfway (1: every client's first)")
    parser.add_argument("--down-seconds", type=float, default=10.0, help="how long the killed node stays down")
    args = parser.parse_args()

    url = os.environ.get("SOAK_DATABASE_URL", DEFAULT_DATABASE_URL)
    cluster_env = {**os.environ, "MAILROOM_CLUSTER_BASE_PORT": os.environ.get("MAILROOM_CLUSTER_BASE_PORT", "5700"),
                   "MAILROOM_CLUSTER_DIR": "/tmp/mailroom-cluster-soak", "MAILROOM_CLUSTER_PREFIX": "mailroom-soak"}
    script = str(ROOT / "scripts" / "cluster.sh")
    print(f"database {url} (recreated), cluster on base port {cluster_env['MAILROOM_CLUSTER_BASE_PORT']}", flush=True)
    recreate_database(url)
    variables = dict(line.removeprefix("export ").split("=", 1) for line in sh(script, "up", env=cluster_env).splitlines())
    variables = {k: v.strip("'") for k, v in variables.items()}
    env = {**os.environ, **variables, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "config.settings",
           "PYTHONUNBUFFERED": "1"}
    os.environ.update(env)
    sh(sys.executable, "manage.py", "migrate", "--noinput", "-v0", env=env)

    import django

    django.setup()
    logs = Path("/tmp/mailroom-cluster-soak-logs")
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(*args_: str, name: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            p = subprocess.Popen([sys.executable, "manage.py", *args_], cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    soak = Soak(args)
    try:
        workers = [start("consume", QUEUE, "--queue-type", "quorum", name=f"worker{i}") for i in range(args.workers)]
        time.sleep(5)  # the quorum queue declared before the relays publish to it
        for i in range(args.relays):
            start("relay", "--idle", "0.1", name=f"relay{i}")
        threads = [threading.Thread(target=soak.feed), threading.Thread(target=soak.poll)]
        for t in threads:
            t.start()
        rss_start = None
        killed = None
        next_report = time.monotonic() + 30
        while soak.seen < args.messages:
            time.sleep(0.5)
            if rss_start is None and soak.seen >= 10_000:
                rss_start = [rss_mb(w.pid) for w in workers]
            if killed is None and soak.seen >= args.messages // 2:
                sh(script, "kill", str(args.kill_node), env=cluster_env)
                killed = time.monotonic()
                print(f"node {args.kill_node} killed -9 at {soak.seen} letters recorded", flush=True)
                time.sleep(args.down_seconds)
                sh(script, "start", str(args.kill_node), env=cluster_env)
                print(f"node {args.kill_node} started again after {time.monotonic() - killed:.0f}s", flush=True)
            if any(p.poll() is not None for p in procs):
                sys.exit(f"a worker or relay exited: see {logs}")
            if time.monotonic() >= next_report:
                next_report += 30
                print(f"  {time.monotonic() - soak.first_write:.0f}s: written {len(soak.written_at)}, "
                      f"recorded {soak.seen}", flush=True)
        rss_end = [rss_mb(w.pid) for w in workers]
        soak.done.set()
        for t in threads:
            t.join()
        duration = soak.last_seen - soak.first_write
        # A delivery seen acked may have been undone since (its ack lost with the connection): wait
        # for its redelivery to be recorded, and for late copies, before counting.
        deadline = time.monotonic() + 60
        while recorded() < args.messages and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
        report(soak, args, duration, rss_start or [], rss_end, codes)
    finally:
        soak.done.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
        sh(script, "down", env=cluster_env)


def recorded() -> int:
    """Letters with an acked delivery on the soak's queue."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT message_id) FROM messaging_delivery WHERE queue = %s AND status = 'acked'",
                       [QUEUE])
        return cursor.fetchone()[0]


def report(soak: Soak, args, duration: float, rss_start, rss_end, codes) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FILTER (WHERE status = 'published'), count(*) FROM messaging_message "
                       "WHERE message_id LIKE 'soak-%%'")
        published, letters = cursor.fetchone()
        cursor.execute("SELECT count(DISTINCT message_id) FILTER (WHERE status = 'acked'), "
                       "count(*) FILTER (WHERE duplicate), count(*) FILTER (WHERE status = 'received'), count(*) "
                       "FROM messaging_delivery WHERE queue = %s", [QUEUE])
        acked, duplicates, received, deliveries = cursor.fetchone()
    lat = sorted(soak.latencies)
    p50 = statistics.median(lat) * 1000
    p99 = lat[int(len(lat) * 0.99) - 1] * 1000
    print(f"\nsoak: {args.messages} letters, {args.workers} workers, {args.relays} relays, 3-node cluster, quorum queue, "
          f"PostgreSQL; node {args.kill_node} killed -9 halfway, down {args.down_seconds:.0f}s")
    print(f"throughput: {args.messages / duration:.0f} letters/s ({duration:.0f}s from first write to last record)")
    print(f"outbox row committed -> delivery row committed: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(f"worker RSS after 10k letters: {', '.join(f'{r:.0f}' for r in rss_start)} MiB; "
          f"at the end: {', '.join(f'{r:.0f}' for r in rss_end)} MiB")
    print(f"letters written {letters}, published {published}, recorded with an acked delivery {acked}")
    print(f"lost: {args.messages - acked} (must be 0); duplicates recorded as deliveries: {duplicates}; "
          f"deliveries {deliveries}; left 'received': {received}; exit codes {codes}")


if __name__ == "__main__":
    main()
