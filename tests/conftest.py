"""Shared fixtures: the real RabbitMQ, the real database, `consume` as a real subprocess.

A broker that does not answer fails the run (it never skips): these tests are the proof.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import pytest
from django.conf import settings
from django.db import connection

from messaging.amqp.publisher import _local

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def rabbitmq_answers():
    """Fail the whole run, loudly, when RabbitMQ is not there."""
    try:
        pika.BlockingConnection(pika.URLParameters(settings.RABBITMQ_URL.split(",")[0])).close()
    except Exception as exc:  # noqa: BLE001
        pytest.exit(f"RabbitMQ does not answer at RABBITMQ_URL ({exc.__class__.__name__}); start it first.", returncode=3)


@pytest.fixture
def publisher_client(client):
    """The test client, logged in as 'pat', who may publish and read letters (add_message, view_message)."""
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user("pat", password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    client.force_login(user)
    return client


@pytest.fixture
def fresh_publisher():
    """This thread's publisher made anew before and after the test: a publisher reads
    MAILROOM_PUBLISH_TIMEOUT when it is created and RABBITMQ_URL when it connects, and the test may
    change both (set them before the first publish)."""

    def forget():
        current = getattr(_local, "publisher", None)
        if current is not None:
            current.close()
        _local.__dict__.clear()

    forget()
    yield
    forget()


@pytest.fixture
def amqp():
    """A plain pika channel: the outside producer/consumer of the tests."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.RABBITMQ_URL.split(",")[0]))
    yield conn.channel()
    try:
        if conn.is_open:
            conn.close()
    except pika.exceptions.AMQPError:
        pass  # the test restarted or blocked the broker: the connection is already gone


@pytest.fixture
def queue_name(request):
    """A queue name of this test's own; the queue is deleted afterwards."""
    name = f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield name
    delete_queue(name)


def delete_queue(name: str) -> None:
    # Each address in turn: a test may have listed a dead node first (RABBITMQ_URL, a cluster).
    for url in settings.RABBITMQ_URL.split(","):
        try:
            conn = pika.BlockingConnection(pika.URLParameters(url))
        except Exception:  # noqa: BLE001 — best effort cleanup: the next address
            continue
        try:
            conn.channel().queue_delete(queue=name)
        except Exception:  # noqa: BLE001
            pass
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return


def queue_depth(name: str) -> tuple[int, int]:
    """(ready, consumers) of an existing queue, by a passive declare."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.RABBITMQ_URL.split(",")[0]))
    try:
        ok = conn.channel().queue_declare(queue=name, passive=True)
        return ok.method.message_count, ok.method.consumer_count
    finally:
        conn.close()


def database_url() -> str:
    """DATABASE_URL of the test database, for subprocesses."""
    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1", "DJANGO_SETTINGS_MODULE": "config.settings"})
    env.update(extra)
    return env


class Process:
    """A `manage.py` subprocess whose output is kept in a file (so pipes never fill up)."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, log_dir: Path) -> None:
        self.args = args
        self.log_path = log_dir / f"{args[0]}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env or subprocess_env(),
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.args} did not exit within {timeout}s:\n{self.output[-4000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def manage(tmp_path):
    """Start `manage.py ARGS...` subprocesses against the test database; all are killed at the end."""
    started: list[Process] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        p = Process([str(a) for a in args], env=env, log_dir=tmp_path)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def wait_for(predicate, *, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def plain_static_storage(settings):
    """Pages render without `collectstatic` (the manifest storage is for deployments)."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
