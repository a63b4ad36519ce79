"""Clear exits: an unmigrated database stops `consume`, `relay` and the web at once; `publish`'s exit codes."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.db import connection

from messaging.management.commands.publish import EXIT_CODES
from messaging.models import Message
from tests.conftest import ROOT, Process, subprocess_env, wait_for

MIGRATE = "run `python manage.py migrate`"


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request, tmp_path):
    """DATABASE_URL of a database that answers but has none of Mailroom's tables.

    SQLite: an empty file. PostgreSQL (when the tests run on it): an empty database of its own, dropped afterwards.
    """
    if request.param == "sqlite":
        path = tmp_path / "empty.sqlite3"
        path.touch()
        yield f"sqlite:///{path}"
        return
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL: run with DATABASE_URL=postgres://...")
    import psycopg

    s = connection.settings_dict
    name = f"mailroom_unmigrated_{uuid.uuid4().hex[:8]}"
    server = {"host": s["HOST"] or "127.0.0.1", "port": s["PORT"] or 5432, "user": s["USER"],
              "password": s["PASSWORD"] or None, "dbname": "postgres", "autocommit": True}
    with psycopg.connect(**server) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
        yield f"postgres://{auth}@{server['host']}:{server['port']}/{name}"
    finally:
        with psycopg.connect(**server) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(command: list[str], url: str, timeout: float = 15) -> tuple[int, str, float]:
    """Run `command` against the database at `url`: (exit code, output, seconds taken)."""
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=subprocess_env(DATABASE_URL=url), capture_output=True, text=True,
                          timeout=timeout, check=False)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.mark.parametrize("args", [["consume", "hello"], ["relay"]], ids=["consume", "relay"])
def test_commands_exit_1_at_once_on_an_unmigrated_database(unmigrated_url, args):
    code, output, took = run([sys.executable, "manage.py", *args], unmigrated_url)
    assert code == 1, output
    assert MIGRATE in output, output
    assert "retrying" not in output
    assert took < 15


def test_migrate_is_what_it_takes(unmigrated_url):
    """The refusal is not a system check, which would stop `migrate` itself (it runs the database's checks)."""
    code, output, _ = run([sys.executable, "manage.py", "migrate", "--noinput"], unmigrated_url, timeout=120)
    assert code == 0, output
    code, output, _ = run([sys.executable, "manage.py", "relay", "--once"], unmigrated_url)
    assert code == 0 and MIGRATE not in output, output


def test_web_refuses_to_start_on_an_unmigrated_database(unmigrated_url):
    """gunicorn reads gunicorn.conf.py from the working directory (the Procfile's and docs/deployment.md's)."""
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    code, output, _ = run([gunicorn, "config.wsgi", "--bind", "127.0.0.1:0"], unmigrated_url)
    assert code == 1, output
    assert MIGRATE in output, output


def test_a_database_that_does_not_answer_is_still_waited_for(tmp_path):
    """Only "answers, but not migrated" exits: a database that is down keeps the retry with backoff."""
    env = subprocess_env(DATABASE_URL="postgres://postgres@127.0.0.1:1/mailroom")  # nothing listens there
    worker = Process(["consume", "hello"], env=env, log_dir=tmp_path)
    try:
        wait_for(lambda: "retrying in" in worker.output, timeout=15, message="the worker to retry")
        assert worker.proc.poll() is None, worker.output
        assert MIGRATE not in worker.output
    finally:
        worker.stop()


# --- publish's exit codes --------------------------------------------------------------------------------
def publish(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", "publish", *args], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.django_db(transaction=True)
def test_publish_exit_codes(queue_name):
    assert EXIT_CODES == {"published": 0, "unroutable": 3, "failed": 4, "pending": 5}

    missing = publish(queue_name, "to nowhere")  # the queue does not exist
    assert missing.returncode == 3, missing.stdout + missing.stderr
    assert "unroutable" in missing.stdout

    published = publish(queue_name, "declared", "--declare")
    assert published.returncode == 0, published.stdout + published.stderr
    assert published.stdout.split()[1] == "published"
    again = publish(queue_name, "to the queue now there")
    assert again.returncode == 0, again.stdout + again.stderr

    no_exchange = publish("k", "refused", "--exchange", f"t-missing-{uuid.uuid4().hex[:8]}")
    assert no_exchange.returncode == 4, no_exchange.stdout + no_exchange.stderr
    assert "failed" in no_exchange.stdout and "404" in no_exchange.stdout

    down = publish(queue_name, "later", RABBITMQ_URL="amqp://guest:guest@127.0.0.1:1/%2F")  # nothing listens there
    assert down.returncode == 5, down.stdout + down.stderr
    assert "pending" in down.stdout

    statuses = sorted(Message.objects.values_list("status", flat=True))
    assert statuses == ["failed", "pending", "published", "published", "unroutable"]


@pytest.mark.django_db(transaction=True)
def test_publish_invalid_letter_exits_1_and_usage_error_2(queue_name):
    invalid = publish(queue_name, "body", "--header", "no-equals-sign")
    assert invalid.returncode == 1 and "NAME=VALUE" in invalid.stderr, invalid.stderr
    usage = publish(queue_name, "body", "--no-such-option")
    assert usage.returncode == 2, usage.stderr
