"""Passwords as people write them stay masked in `diffsettings`, logs and the DEBUG page, in a database outage too."""
from __future__ import annotations

import socket
import subprocess
import sys
from http import HTTPStatus

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.urls import path

from tests.conftest import ROOT, subprocess_env

# pika reads all of these as passwords: the last `@` before the host ends the userinfo.
PASSWORDS = ["Br@kerPw", "two words", "p%40ss-9c1"]
RABBITMQ_URL = ",".join(f"amqp://mailroom:{p}@rabbit-{i}.invalid:5672/%2F" for i, p in enumerate(PASSWORDS))
DATABASE_PASSWORD = "db@Pw 7b1d0a"


def manage_py(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=60)


def assert_no_password(text: str) -> None:
    for secret in (*PASSWORDS, "Br@ker", "kerPw", "two words", "p%40ss", DATABASE_PASSWORD, "7b1d0a"):
        assert secret not in text, secret


def test_diffsettings_masks_passwords_however_they_are_written():
    out = manage_py("diffsettings", "--all", RABBITMQ_URL=RABBITMQ_URL,
                    DATABASE_URL=f"postgres://mailroom:{DATABASE_PASSWORD}@127.0.0.1:5432/mailroom")
    assert out.returncode == 0, out.stderr
    masked = ",".join(f"amqp://mailroom:***@rabbit-{i}.invalid:5672/%2F" for i in range(len(PASSWORDS)))
    assert f"RABBITMQ_URL = {masked!r}" in out.stdout
    assert "'PASSWORD': '********************'" in out.stdout  # DATABASES, hidden by the key's name
    assert_no_password(out.stdout + out.stderr)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_logged_url_shows_no_password(log_format):
    code = ("import logging; from django.conf import settings\n"
            "logging.getLogger('messaging.test').warning('connecting to %s', settings.RABBITMQ_URL)\n")
    out = manage_py("shell", "-c", code, RABBITMQ_URL=RABBITMQ_URL, MAILROOM_LOG_FORMAT=log_format)
    assert out.returncode == 0, out.stderr
    assert "connecting to amqp://mailroom:***@rabbit-0.invalid:5672/%2F,amqp://mailroom:***@rabbit-1" in out.stderr
    assert_no_password(out.stdout + out.stderr)


def letters_then_boom(request):
    users = User.objects.filter(is_active=True)  # a QuerySet in the frame: its repr would query the database
    raise RuntimeError(f"cannot reach the broker at {RABBITMQ_URL} for {users.model.__name__}")


urlpatterns = [path("boom/", letters_then_boom)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


@pytest.mark.django_db(transaction=True)
def test_the_debug_page_renders_masked_while_the_database_is_down(client, settings, monkeypatch, tmp_path):
    settings.DEBUG = True
    settings.ROOT_URLCONF = __name__
    settings.RABBITMQ_URL = RABBITMQ_URL
    client.raise_request_exception = False
    connection.close()
    # The database unreachable for real: PostgreSQL on a closed port, SQLite in a directory that is not there.
    if connection.vendor == "postgresql":
        monkeypatch.setitem(connection.settings_dict, "HOST", "127.0.0.1")
        monkeypatch.setitem(connection.settings_dict, "PORT", closed_port())
    else:
        monkeypatch.setitem(connection.settings_dict, "NAME", str(tmp_path / "missing" / "db.sqlite3"))
    try:
        with pytest.raises(Exception, match="connect|open"):  # noqa: PT011 - each database words it its own way
            User.objects.exists()
        response = client.get("/boom/", DATABASE_URL=f"postgres://mailroom:{DATABASE_PASSWORD}@db/mailroom")
    finally:
        connection.close()
    assert response.status_code == HTTPStatus.INTERNAL_SERVER_ERROR
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "RuntimeError" in page and "cannot reach the broker at amqp://mailroom:***@rabbit-0.invalid" in page
    assert "&lt;QuerySet (not evaluated)&gt;" in page
    assert_no_password(page)
