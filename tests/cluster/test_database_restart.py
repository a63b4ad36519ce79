"""PostgreSQL restarted under load, on the cluster: the relay and two workers back off and resume,
the web answers 503 from /healthz meanwhile and 200 after, and nothing is lost or recorded twice.

The shared PostgreSQL is never touched: the test runs a throwaway PostgreSQL cluster of its own
(initdb, pg_ctl) on a free port in a temporary directory, migrates it, points the relay, the
workers and the web at it, and restarts that one.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import environ
import pytest
from django.db import connections

from tests.cluster.harness import (
    Outbox,
    assert_nothing_lost,
    attach_database,
    detach_database,
    monotonic_wait,
    settle,
    start_crew,
)
from tests.conftest import ROOT, subprocess_env, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PG_BIN = Path(os.environ.get("MAILROOM_PG_BIN", "/usr/lib/postgresql/15/bin"))
ALIAS = "throwaway"

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
        if not (PG_BIN / "initdb").exists():
            pytest.fail(f"no PostgreSQL programs in {PG_BIN} (set MAILROOM_PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="mailroom-pg-"))
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/mailroom"
        self.settings: dict = {}  # Django's settings of its database (see `throwaway_postgres`)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.run(str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync")
        self.start()
        self.run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mailroom")

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
    """The throwaway PostgreSQL, migrated, and reachable in this process as the database alias 'throwaway'."""
    pg = ThrowawayPostgres()
    try:
        out = subprocess.run([sys.executable, str(ROOT / "manage.py"), "migrate", "--noinput", "-v0"], cwd=ROOT, env=subprocess_env(DATABASE_URL=pg.url), check=False,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        pg.settings = connections.configure_settings({"default": {}, ALIAS: environ.Env.db_url_config(pg.url)})[ALIAS]
        attach_database(ALIAS, pg.settings)
        yield pg
        detach_database(ALIAS)
    finally:
        pg.remove()


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
            monotonic_wait(3)  # the database stays down a while: the relay and the workers back off
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
    settle(outbox, queue_name)
    crew.stop()
    figures = assert_nothing_lost(outbox, queue_name, on_cluster)
    assert outbox.failures >= 1, "the outbox never saw the database go"
    assert any("database unavailable" in w.output for w in crew.workers), "no worker saw the database go"
    assert "database unavailable" in crew.relay.output, crew.relay.output[-3000:]
    logger.info("PostgreSQL restart: %s", figures)
