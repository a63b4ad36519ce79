"""Shared fixtures: the real RabbitMQ, the real database, `consume` as a real subprocess.

Three tiers (pytest.ini's markers, applied here by where a test lives):

* `unit`: everything under tests/unit/: no broker, no database server (SQLite in-process at most);
  `pytest -m unit` runs with RabbitMQ stopped.
* `integration`: every other test: the real RabbitMQ (and the database of DATABASE_URL). A broker
  that does not answer fails the run (it never skips): these tests are the proof.
* `node`: integration tests that change the RabbitMQ node itself (stop_app, alarms).

Where the broker is comes from the environment, never from a port written in a test:
RABBITMQ_URL (the broker), RABBITMQ_MANAGEMENT_URL (its management API), RABBITMQ_NODENAME (the
node `rabbitmqctl` talks to). See the helpers below.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pytest
from django.db import connection

from messaging.amqp.publisher import _local

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = Path(__file__).resolve().parent / "unit"

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"


# --- tiers ----------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """`unit` for every test under tests/unit/, `integration` for every other one."""
    for item in items:
        if UNIT_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.unit)
        else:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def rabbitmq_answers():
    """Fail the whole run, loudly, when RabbitMQ is not there (asked once, by the first integration test)."""
    try:
        pika.BlockingConnection(pika.URLParameters(rabbitmq_url())).close()
    except Exception as exc:  # noqa: BLE001
        pytest.exit(f"RabbitMQ does not answer at RABBITMQ_URL ({exc.__class__.__name__}); start it first.", returncode=3)


@pytest.fixture(autouse=True)
def integration_needs_the_broker(request):
    """Every test but the unit tier's needs the real broker: a run of unit tests alone never asks for it."""
    if request.node.get_closest_marker("unit") is None:
        request.getfixturevalue("rabbitmq_answers")


@pytest.fixture(autouse=True)
def fresh_cache():
    """No broker answer or alarm kept from another test (pages keep them in Django's cache for a moment)."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def management_api_off_unless_asked(settings):
    """Pages do not use the management API unless a test sets RABBITMQ_MANAGEMENT_URL (to `management_url()`):
    the same in CI as on a machine whose environment or .env sets it for the app."""
    settings.RABBITMQ_MANAGEMENT_URL = ""


# --- where the broker is: RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL, RABBITMQ_NODENAME -----------------
def rabbitmq_urls() -> list[str]:
    """The addresses of RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/%2F), in order."""
    value = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    return [part.strip() for part in value.split(",") if part.strip()] or [DEFAULT_RABBITMQ_URL]


def rabbitmq_url() -> str:
    """The broker the tests use: the first address of RABBITMQ_URL, whatever a test set in `settings`."""
    return rabbitmq_urls()[0]


def url_with(url: str, *, user: str | None = None, password: str | None = None, path: str | None = None) -> str:
    """`url` with other credentials and/or another path; scheme, host, port and query kept."""
    split = urlsplit(url)
    host = split.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if split.port:
        host = f"{host}:{split.port}"
    user = quote(unquote(split.username or "") if user is None else user, safe="")
    password = quote(unquote(split.password or "") if password is None else password, safe="")
    auth = f"{user}:{password}@" if user or password else ""
    return urlunsplit((split.scheme, auth + host, split.path if path is None else path, split.query, ""))


def rabbitmq_url_with(*, user: str | None = None, password: str | None = None, vhost: str | None = None) -> str:
    """The broker's URL (its host and port) with other credentials or another vhost: a refused login, a missing vhost."""
    return url_with(rabbitmq_url(), user=user, password=password,
                    path=None if vhost is None else "/" + quote(vhost, safe=""))


def rabbitmq_host() -> str:
    """The host of `rabbitmq_url()` as it is written there (e.g. 127.0.0.1)."""
    return urlsplit(rabbitmq_url()).hostname or "localhost"


def rabbitmq_vhost() -> str:
    """The vhost of `rabbitmq_url()` ('/' by default), URL-quoted as the management API's paths take it."""
    path = urlsplit(rabbitmq_url()).path
    return quote(unquote(path[1:]) if len(path) > 1 else "/", safe="")


def management_url() -> str:
    """RABBITMQ_MANAGEMENT_URL, default http://guest:guest@127.0.0.1:15672/ (for `settings.RABBITMQ_MANAGEMENT_URL`)."""
    return os.environ.get("RABBITMQ_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL


def management_api_base() -> str:
    """The management API's base without credentials, e.g. http://127.0.0.1:15672/api (see `management_request`)."""
    split = urlsplit(url_with(management_url(), user="", password=""))
    return urlunsplit((split.scheme, split.netloc, split.path.rstrip("/") + "/api", "", ""))


def management_request(path: str, *, method: str = "GET", data: bytes | None = None) -> urllib.request.Request:
    """A urllib request for `<management_api_base()>/<path>`, with the management URL's credentials."""
    split = urlsplit(management_url())
    request = urllib.request.Request(f"{management_api_base()}/{path.lstrip('/')}", method=method, data=data)
    user, password = unquote(split.username or "guest"), unquote(split.password or "guest")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    if data is not None:
        request.add_header("Content-Type", "application/json")
    return request


def management_api(path: str, *, method: str = "GET", timeout: float = 10):
    """The management API's JSON answer at `path` (None for an empty body)."""
    with urllib.request.urlopen(management_request(path, method=method), timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def rabbitmqctl_command(*args: str) -> list[str]:
    """`rabbitmqctl ARGS`, for the node RABBITMQ_NODENAME names when it is set."""
    node = os.environ.get("RABBITMQ_NODENAME")
    return ["rabbitmqctl", *(["-n", node] if node else []), *args]


def rabbitmqctl(*args: str, timeout: float = 90) -> str:
    """Run `rabbitmqctl ARGS` on the tests' node; its output, or the test fails with rabbitmqctl's error."""
    out = subprocess.run(rabbitmqctl_command(*args), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.stderr}"
    return out.stdout


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
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
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
    # Each address in turn: RABBITMQ_URL may list a dead node first (a cluster).
    for url in rabbitmq_urls():
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
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
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
