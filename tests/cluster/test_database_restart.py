"""PostgreSQL restarted under load, on the cluster: the relay and two workers back off and resume,
the web answers 503 from /healthz meanwhile and 200 after, and nothing is lost or recorded twice.

The shared PostgreSQL is never touched: the test runs a throwaway PostgreSQL cluster of its own
(initdb, pg_ctl) on a free port in a temporary directory, migrates it, points the relay, the
workers and the web at it, and restarts that one. Its schema is a copy of the tests' own database.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import environ
import pika
import pytest
from django.db import connection, connections

from tests.cluster.harness import (
    Outbox,
    assert_nothing_lost,
    attach_database,
    detach_database,
    monotonic_wait,
    settle,
    start_crew,
)
from tests.conftest import subprocess_env, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PG_BIN = Path(os.environ.get("MAILROOM_PG_BIN", "/usr/lib/postgresql/15/bin"))
ALIAS = "throwaway"
COPIES = 20

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(*command: str) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary directory, on a free port, stopped and removed after."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mailroom-pg-"))
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/mailroom"
        self.settings: dict = {}  # Django's settings of its database (see `throwaway_postgres`)

    def create(self) -> None:
        """initdb, start, and a database `mailroom` with the schema of the tests' own database."""
        if not (PG_BIN / "initdb").exists():
            pytest.fail(f"no PostgreSQL programs in {PG_BIN} (set MAILROOM_PG_BIN)")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.run(str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync")
        self.start()
        self.run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mailroom")
        # A copy of the migrated test database (tables, django_migrations) is seconds; migrating anew, a minute.
        s = connection.settings_dict
        dump = subprocess.run(
            [str(PG_BIN / "pg_dump"), "--no-owner", "--no-privileges", "-h", s["HOST"] or "127.0.0.1",
             "-p", str(s["PORT"] or 5432), "-U", s["USER"], s["NAME"]],
            check=False, capture_output=True, timeout=120, env={**os.environ, "PGPASSWORD": s["PASSWORD"] or ""})
        assert dump.returncode == 0, dump.stderr.decode(errors="replace")
        load = subprocess.run(
            [str(PG_BIN / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "postgres", "-d", "mailroom"], input=dump.stdout, check=False, capture_output=True, timeout=120)
        assert load.returncode == 0, load.stderr.decode(errors="replace")

    def run(self, *command: str) -> None:
        out = subprocess.run(as_postgres(*command), check=False, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{' '.join(command)}: {out.stdout}{out.stderr}"

    def start(self) -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        subprocess.run(as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop"),
                       check=False, capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def throwaway_postgres():
    """The throwaway PostgreSQL, migrated, and open in this thread as the database alias 'throwaway'."""
    pg = ThrowawayPostgres()
    try:
        pg.create()
        pg.settings = connections.configure_settings({"default": {}, ALIAS: environ.Env.db_url_config(pg.url)})[ALIAS]
        attach_database(ALIAS, pg.settings)
        yield pg
        detach_database(ALIAS)
    finally:
        pg.remove()


def publish_copies(cluster, queue: str, message_ids: list[str]) -> list[str]:
    """Publish again, as a producer's retry would, letters the outbox wrote (same message_id, same body)."""
    connection = cluster.connect()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for message_id in message_ids:
            index = message_id.rsplit("-", 1)[1]
            channel.basic_publish(exchange="", routing_key=queue, body=f"letter {index}".encode(),
                                  properties=pika.BasicProperties(message_id=message_id, delivery_mode=2))
    finally:
        connection.close()
    return message_ids


def held_unacked(cluster, queue: str) -> int:
    """The queue's unacked deliveries once none is ready and the copies are among them (else 0)."""
    ready, unacked = cluster.queue_counts(queue)
    return unacked if ready == 0 and unacked >= COPIES else 0


def health(port: int) -> int | None:
    """/healthz's status code, None while the web does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_postgresql_restarted_under_load(on_cluster, throwaway_postgres, queue_name, manage):
    env = subprocess_env(DATABASE_URL=throwaway_postgres.url)
    crew = start_crew(manage, on_cluster, queue_name, env=env)
    web_port = free_port()
    web = manage("runserver", "--noreload", f"127.0.0.1:{web_port}", env=env)
    wait_for(lambda: health(web_port) == 200, timeout=30, interval=0.3, message="/healthz 200")
    outbox = Outbox(queue_name, using=ALIAS, database=throwaway_postgres.settings).start()
    try:
        wait_for(lambda: len(outbox.ids) >= 300, timeout=30, message=f"letters written ({outbox.last_error})")
        throwaway_postgres.stop()
        try:
            wait_for(lambda: health(web_port) == 503, timeout=15, interval=0.3, message="/healthz 503")
            # A producer's retry of letters already recorded reaches the workers while the database is
            # down: they must hold the copies unacked, and record them (as duplicates) once it is back.
            copies = publish_copies(on_cluster, queue_name, outbox.ids[:COPIES])
            held = wait_for(lambda: held_unacked(on_cluster, queue_name), timeout=20, interval=0.3,
                            message="the copies delivered and held unacked")
            wait_for(lambda: any("database unavailable" in w.output for w in crew.workers), timeout=20,
                     message="a worker to find the database gone")
            monotonic_wait(3)  # the database stays down a while: the relay and the workers back off
            assert on_cluster.queue_counts(queue_name) == (0, held), "acked while the database was down"
            assert health(web_port) == 503
            for p in [crew.relay, *crew.workers, web]:
                assert p.proc.poll() is None, p.output[-3000:]
        finally:
            throwaway_postgres.start()
        wait_for(lambda: health(web_port) == 200, timeout=30, interval=0.3, message="/healthz 200 again")
        written = len(outbox.ids)
        wait_for(lambda: len(outbox.ids) >= written + 300, timeout=30, message="letters written after")
    finally:
        outbox.stop()
    settle(outbox, queue_name, on_cluster)
    crew.stop()
    figures = assert_nothing_lost(outbox, queue_name, on_cluster)
    assert figures["duplicates"] >= len(copies), figures
    assert outbox.failures >= 1, "the outbox never saw the database go"
    assert "database unavailable" in crew.relay.output, crew.relay.output[-3000:]
    logger.info("PostgreSQL restart: %s", figures)
