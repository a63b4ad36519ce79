"""Production settings: `check --deploy` clean, secrets masked everywhere, CSP, bad Host → 400, gunicorn + whitenoise."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import path

from tests.conftest import (
    ROOT,
    management_url,
    rabbitmq_host,
    rabbitmq_url_with,
    subprocess_env,
    url_with,
    wait_for,
)

logger = logging.getLogger(__name__)

PASSWORD = "mq-Pw-4f9c2e"
DB_PASSWORD = "db-Pw-7b1d0a"
# The broker's host and port with a user that does not exist there: a login the broker refuses.
SECRET_URL = rabbitmq_url_with(user="mailroom", password=PASSWORD)
# A second node that is never contacted (the masking of a cluster's addresses).
OTHER_NODE_URL = f"amqp://mailroom:{PASSWORD}@rabbit-2.invalid/%2F"

# The production environment documented in the README (docs/deployment.md).
PRODUCTION_ENV = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "Zq8vN3kP0rT7wX2yB5mC9dF4gH6jL1sA8eU3iO0pQ7zR2tY5vW9xK4nM6bV1cJ3h",
    "DJANGO_ALLOWED_HOSTS": "mailroom.example.com",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://mailroom.example.com",
    "DJANGO_HTTPS": "true",
    "DJANGO_SECURE_PROXY_SSL_HEADER": "true",
}


def manage_py(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def without_django_env(env: dict[str, str]) -> dict[str, str]:
    """The environment minus the DJANGO_* variables a developer may have set."""
    return {k: v for k, v in env.items() if not k.startswith("DJANGO_") or k == "DJANGO_SETTINGS_MODULE"}


@pytest.mark.django_db(transaction=True)
def test_check_deploy_is_clean_with_the_documented_production_environment():
    base = without_django_env(subprocess_env(RABBITMQ_URL=SECRET_URL))
    production = manage_py("check", "--deploy", "--fail-level", "WARNING", env={**base, **PRODUCTION_ENV})
    assert production.returncode == 0, production.stdout + production.stderr
    assert "no issues" in production.stdout

    # The development defaults (plain http on 127.0.0.1, a throwaway key) are what it flags.
    development = manage_py("check", "--deploy", "--fail-level", "WARNING", env=base)
    assert development.returncode != 0
    for check in ("security.W004", "security.W008", "security.W009", "security.W012", "security.W016"):
        assert check in development.stderr


def boom(request):
    url = settings.RABBITMQ_URL  # a frame variable the DEBUG page would show
    raise RuntimeError(f"cannot reach the broker at {url}")


urlpatterns = [path("boom/", boom)]


def test_debug_error_page_masks_the_broker_password(client, settings):
    settings.DEBUG = True
    settings.ROOT_URLCONF = __name__
    settings.RABBITMQ_URL = SECRET_URL
    settings.RABBITMQ_MANAGEMENT_URL = url_with(management_url(), user="mailroom", password=PASSWORD)
    client.raise_request_exception = False
    response = client.get(
        "/boom/", RABBITMQ_URL=SECRET_URL, DATABASE_URL=f"postgres://mailroom:{DB_PASSWORD}@db/mailroom",
    )
    assert response.status_code == HTTPStatus.INTERNAL_SERVER_ERROR
    page = response.content.decode()
    assert "RuntimeError" in page and "RABBITMQ_URL" in page  # it is the technical 500 page
    assert PASSWORD not in page
    assert DB_PASSWORD not in page
    assert f"mailroom:***@{rabbitmq_host()}" in page


def test_diffsettings_masks_secrets():
    env = subprocess_env(
        RABBITMQ_URL=f"{SECRET_URL},{OTHER_NODE_URL}",
        DATABASE_URL=f"postgres://mailroom:{DB_PASSWORD}@127.0.0.1:5432/mailroom",
        DJANGO_SECRET_KEY="a-secret-key-that-must-not-show-0123456789-abcdefghij",
    )
    out = manage_py("diffsettings", "--all", env=env)
    assert out.returncode == 0, out.stderr
    masked = f"{SECRET_URL},{OTHER_NODE_URL}".replace(f":{PASSWORD}@", ":***@")
    assert f"RABBITMQ_URL = {masked!r}" in out.stdout
    for secret in (PASSWORD, DB_PASSWORD, "a-secret-key-that-must-not-show"):
        assert secret not in out.stdout


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_never_show_the_password(log_format):
    # A record that quotes the URL, and a traceback that carries it, through the configured LOGGING.
    code = (
        "import logging; from django.conf import settings; log = logging.getLogger('messaging.test')\n"
        "log.warning('connecting to %s', settings.RABBITMQ_URL)\n"
        "try:\n    raise ConnectionError(settings.RABBITMQ_URL)\n"
        "except ConnectionError:\n    log.exception('failed')\n"
    )
    out = manage_py("shell", "-c", code, env=subprocess_env(RABBITMQ_URL=SECRET_URL, MAILROOM_LOG_FORMAT=log_format))
    assert out.returncode == 0, out.stderr
    logged = out.stdout + out.stderr
    assert f"connecting to amqp://mailroom:***@{rabbitmq_host()}" in logged
    assert "ConnectionError: amqp://mailroom:***@" in logged
    assert PASSWORD not in logged

    # A worker that cannot log in, stopped after it has said so.
    env = subprocess_env(RABBITMQ_URL=SECRET_URL, MAILROOM_LOG_FORMAT=log_format)
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "consume", "t-never-used", "-v", "2"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = worker.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=15)
    assert "cannot consume" in output or "refused" in output, output
    assert PASSWORD not in output


@pytest.mark.django_db
def test_csp_header_and_bad_host(client):
    response = client.get("/accounts/login/")
    assert response.status_code == HTTPStatus.OK
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "object-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/accounts/login/", HTTP_HOST="evil.example.com").status_code == HTTPStatus.BAD_REQUEST


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch(url: str, **headers: str):
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.mark.django_db(transaction=True)
def test_gunicorn_serves_with_production_settings(tmp_path):
    """The Procfile's web line with the production environment: headers, whitenoise, https, Host."""
    env = {**without_django_env(subprocess_env()), **PRODUCTION_ENV, "DJANGO_STATIC_ROOT": str(tmp_path / "static")}
    collected = manage_py("collectstatic", "--noinput", "-v0", env=env)
    assert collected.returncode == 0, collected.stderr
    port = free_port()
    log = open(tmp_path / "gunicorn.log", "wb")
    server = subprocess.Popen(
        [str(ROOT / ".venv/bin/gunicorn") if (ROOT / ".venv/bin/gunicorn").exists() else "gunicorn",
         "config.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "2"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    good = {"Host": "mailroom.example.com", "X-Forwarded-Proto": "https"}
    try:
        wait_for(lambda: _answers(base, good), timeout=30, message="gunicorn to answer")
        status, headers, body = fetch(f"{base}/accounts/login/", **good)
        assert status == HTTPStatus.OK
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert headers["Strict-Transport-Security"].startswith("max-age=31536000")
        assert headers["X-Frame-Options"] == "DENY"
        stylesheet = re.search(rb'href="(/static/messaging/mailroom\.[0-9a-f]+\.css)"', body)
        assert stylesheet, "the manifest storage names the stylesheet by its hash"
        status, headers, _ = fetch(base + stylesheet.group(1).decode(), **good)
        assert status == HTTPStatus.OK
        assert "max-age=315360000" in headers["Cache-Control"]  # whitenoise: hashed names cached forever

        status, headers, _ = fetch(f"{base}/accounts/login/", Host="mailroom.example.com")
        assert status == HTTPStatus.MOVED_PERMANENTLY and headers["Location"].startswith("https://")
        status, _, _ = fetch(f"{base}/accounts/login/", Host="evil.example.com", **{"X-Forwarded-Proto": "https"})
        assert status == HTTPStatus.BAD_REQUEST
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "gunicorn.log").read_text()


def _answers(base: str, headers: dict[str, str]) -> bool:
    try:
        return fetch(f"{base}/accounts/login/", **headers)[0] == HTTPStatus.OK
    except OSError:
        time.sleep(0.2)
        return False


@pytest.mark.django_db(transaction=True)
def test_ensure_admin_creates_one_superuser_and_says_how_to_log_in(monkeypatch):
    from io import StringIO

    from django.contrib.auth.models import User
    from django.core.management import call_command

    monkeypatch.setenv("MAILROOM_BIND", "0.0.0.0:8123")
    out = StringIO()
    call_command("ensure_admin", stdout=out)
    password = re.search(r"with password '([^']+)'", out.getvalue()).group(1)
    assert "http://127.0.0.1:8123/accounts/login/" in out.getvalue()
    admin = User.objects.get(is_superuser=True)
    assert admin.username == "admin" and admin.check_password(password)
    out = StringIO()
    call_command("ensure_admin", stdout=out)
    assert "A superuser exists" in out.getvalue()
    assert User.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_procfile_runs_under_honcho_and_ctrl_c_stops_everything(tmp_path):
    """What `make run` ends with: honcho runs the Procfile; SIGINT (Ctrl-C) stops every process cleanly."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**subprocess_env(MAILROOM_BIND=f"127.0.0.1:{port}", MAILROOM_RELAY_GRACE_SECONDS="1"),
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "DJANGO_STATIC_ROOT": str(tmp_path / "static")}
    collected = manage_py("collectstatic", "--noinput", "-v0", env=env)  # as `make run` does first
    assert collected.returncode == 0, collected.stderr
    log = open(tmp_path / "honcho.log", "wb")
    honcho = subprocess.Popen([f"{bin_dir}/honcho", "start", "-f", str(ROOT / "Procfile")], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    output = lambda: (tmp_path / "honcho.log").read_text(errors="replace")  # noqa: E731
    started = lambda: re.findall(r"(\S+)\.1 started \(pid=(\d+)\)", output())  # noqa: E731
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}", {}), timeout=60, message="the web process")
        wait_for(lambda: "consuming queues=hello" in output(), timeout=60, message="the worker")
        assert {"web", "worker"} <= {name for name, _ in started()}, output()
        honcho.send_signal(signal.SIGINT)
        assert honcho.wait(timeout=30) == 130, output()  # honcho's code for "stopped by SIGINT"
    finally:
        if honcho.poll() is None:
            honcho.send_signal(signal.SIGINT)
            try:
                honcho.wait(timeout=20)
            except subprocess.TimeoutExpired:
                honcho.kill()
                honcho.wait()
        for _, pid in started():  # each process runs in a session of its own: never leave one behind
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    text = output()
    for name, pid in started():
        assert f"{name}.1 stopped (rc=0)" in text, text[-3000:]
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert "consume stopped:" in text
