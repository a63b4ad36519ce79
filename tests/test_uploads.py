"""Request bodies: Django's limit for everyone, a letter's worth only for a user who may publish."""
from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
from django.contrib.auth.models import Permission, User

from messaging.models import Message
from messaging.web.api.auth import create_token
from messaging.web.uploads import publish_limit
from tests.conftest import ROOT, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024
FLOOD = 30 * MiB  # each anonymous request's declared body
LETTER = 3 * MiB  # MAILROOM_MAX_BODY_BYTES in these tests: over Django's default limit (2.5 MB)
FORM = "application/x-www-form-urlencoded"


def user_with(*codenames: str, name: str) -> User:
    user = User.objects.create_user(name, password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def letter_form(queue: str, body: str) -> dict:
    return {"mode": "queue", "queue": queue, "body": body, "declare": "on", "body_encoding": "string"}


# --- in-process: who may send how much --------------------------------------------------------------

def test_a_publisher_sends_a_letter_of_the_largest_body_through_the_form_and_the_api(client, settings, queue_name):
    settings.MAILROOM_MAX_BODY_BYTES = LETTER
    publisher = user_with("add_message", "view_message", name="pat")
    client.force_login(publisher)
    body = "é" * (LETTER // 2)  # percent-encoded: three times the default limit
    form = client.post("/publish/", urlencode(letter_form(queue_name, body)), content_type=FORM)
    assert form.status_code == 302, form.content.decode()[:2000]
    _, key = create_token(user=publisher, name="uploads")
    api = client.post("/api/messages/", {"routing_key": queue_name, "body": body, "declare": True},
                      content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert api.status_code == 201, api.content
    assert [bytes(m.body) for m in Message.objects.all()] == [body.encode()] * 2


def test_a_session_posts_a_large_letter_with_its_csrf_token_and_a_reader_cannot(settings, queue_name):
    """A session's CSRF check parses the JSON while DRF authenticates: the limit is the session user's."""
    from django.test import Client

    settings.MAILROOM_MAX_BODY_BYTES = LETTER
    payload = json.dumps({"routing_key": queue_name, "body": "x" * LETTER, "declare": True})
    for name, codenames, status in (("reader", ["view_message"], 413), ("pat", ["add_message", "view_message"], 201)):
        browser = Client(enforce_csrf_checks=True)
        browser.force_login(user_with(*codenames, name=name))
        browser.get("/messages/")  # sets the CSRF cookie
        token = browser.cookies["csrftoken"].value
        response = browser.post("/api/messages/", payload, content_type="application/json", HTTP_X_CSRFTOKEN=token)
        assert response.status_code == status, (name, response.content[:500])
    assert Message.objects.count() == 1


def test_a_body_over_the_setting_is_still_a_form_error_and_a_400(client, settings, queue_name):
    settings.MAILROOM_MAX_BODY_BYTES = LETTER
    client.force_login(user_with("add_message", "view_message", name="pat"))
    form = client.post("/publish/", urlencode(letter_form(queue_name, "x" * (LETTER + 1))), content_type=FORM)
    assert form.status_code == 200 and f"limit is {LETTER} bytes" in form.content.decode()
    api = client.post("/api/messages/", {"routing_key": queue_name, "body": "x" * (LETTER + 1)},
                      content_type="application/json")
    assert api.status_code == 400 and f"limit is {LETTER} bytes" in api.json()["detail"]
    over = "x" * (publish_limit() + 1)
    api = client.post("/api/messages/", {"routing_key": queue_name, "body": over}, content_type="application/json")
    assert api.status_code == 413 and api.json()["code"] == "too_large"
    form = client.post("/publish/", urlencode(letter_form(queue_name, over)), content_type=FORM)
    assert form.status_code == 413 and f"over {publish_limit()} bytes" in form.content.decode()
    assert not Message.objects.exists()


def test_a_large_form_from_anyone_else_is_413_unread(client, settings, queue_name):
    settings.MAILROOM_MAX_BODY_BYTES = LETTER
    large = urlencode(letter_form(queue_name, "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)))
    assert client.post("/publish/", large, content_type=FORM).status_code == 413  # anonymous
    client.force_login(user_with("view_message", name="reader"))
    refused = client.post("/publish/", large, content_type=FORM)
    assert refused.status_code == 413 and b"most this page accepts from you" in refused.content
    assert client.post("/publish/", letter_form(queue_name, "small")).status_code == 403
    api = client.post("/api/messages/", {"routing_key": queue_name, "body": "x" * LETTER},
                      content_type="application/json")
    assert api.status_code == 403
    assert not Message.objects.exists()


def test_a_large_multipart_form_is_413_with_a_sentence(client, settings, queue_name):
    settings.MAILROOM_MAX_BODY_BYTES = LETTER
    client.force_login(user_with("add_message", "view_message", name="pat"))
    response = client.post("/publish/", letter_form(queue_name, "x" * LETTER))  # the test client's multipart
    assert response.status_code == 413 and FORM.encode() in response.content
    assert not Message.objects.exists()


def test_the_form_keeps_its_csrf_check(settings, queue_name):
    from django.test import Client

    settings.MAILROOM_MAX_BODY_BYTES = LETTER
    client = Client(enforce_csrf_checks=True)
    assert client.post("/publish/", letter_form(queue_name, "x")).status_code == 403  # anonymous, as before
    client.force_login(user_with("add_message", "view_message", name="pat"))
    for body in ("x", "x" * LETTER):
        response = client.post("/publish/", urlencode(letter_form(queue_name, body)), content_type=FORM)
        assert response.status_code == 403 and b"CSRF" in response.content
    assert not Message.objects.exists()


# --- a real gunicorn: anonymous floods are refused unread ---------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0]) if children else 0


def flood_one(port: int, path: str, content_type: str, cookie: str, results: list) -> None:
    """POST a declared FLOOD-byte body, sending it while the answer has not come; record the status line."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Cookie: {cookie}\r\nContent-Length: {FLOOD}\r\nConnection: close\r\n\r\n").encode()
    chunk = b"a=" + b"x" * (64 * 1024 - 2)
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sent, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < FLOOD else [], [], 1)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                answer += data
                if not data or b"\r\n" in answer:
                    break
            elif writable:
                try:
                    sent += sock.send(chunk[:FLOOD - sent])
                except (BrokenPipeError, ConnectionResetError):
                    sent = FLOOD  # the server stopped reading: its answer may still be in the buffer
    results.append((path, answer.split(b"\r\n", 1)[0].decode(errors="replace"), sent))


def flood(port: int, path: str, content_type: str, *, cookie: str, requests_at_once: int = 8) -> list:
    results: list = []
    threads = [threading.Thread(target=flood_one, args=(port, path, content_type, cookie, results))
               for _ in range(requests_at_once)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture
def gunicorn(tmp_path):
    port = free_port()
    env = subprocess_env(MAILROOM_MAX_BODY_BYTES=str(LETTER), DJANGO_STATIC_ROOT=str(tmp_path / "static"))
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1",
         "--timeout", "120", "--no-control-socket"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: worker_pid(server.pid) and answers(f"http://127.0.0.1:{port}/accounts/login/"),
                 timeout=30, message="gunicorn to answer")
        yield port, worker_pid(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        time.sleep(0.2)
        return False


def test_anonymous_floods_are_refused_unread_and_a_publisher_still_sends_a_letter(gunicorn, queue_name, capsys):
    port, worker = gunicorn
    base = f"http://127.0.0.1:{port}"
    for path in ("/accounts/login/", "/publish/", "/api/messages/"):  # every view loaded before measuring
        requests.post(base + path, data={"a": "b"}, timeout=30, allow_redirects=False)
    # With a CSRF cookie, as an attacker would send: CsrfViewMiddleware then reads the form for its token.
    cookie = "csrftoken=" + requests.get(base + "/accounts/login/", timeout=30).cookies["csrftoken"]
    before = memory(worker)
    answers_by_path = {}
    for path, content_type in (("/accounts/login/", FORM), ("/publish/", FORM), ("/api/messages/", "application/json")):
        results = flood(port, path, content_type, cookie=cookie)
        assert len(results) == 8
        answers_by_path[path] = sorted({status for _, status, _ in results})
        for _, status, sent in results:
            assert re.fullmatch(r"HTTP/1\.[01] 4\d\d .*", status), (path, status, sent)
    after = memory(worker)
    with capsys.disabled():
        print(f"\nworker RSS before {before['VmRSS']} kB (peak {before['VmHWM']} kB), after 24 anonymous 30 MiB "
              f"POSTs {after['VmRSS']} kB (peak {after['VmHWM']} kB); answers {answers_by_path}")
    assert answers_by_path == {"/accounts/login/": ["HTTP/1.1 400 Bad Request"],
                               "/publish/": ["HTTP/1.1 413 Request Entity Too Large"],
                               "/api/messages/": ["HTTP/1.1 401 Unauthorized"]}
    assert after["VmHWM"] - before["VmRSS"] < 100 * 1024, (before, after)

    # A publisher still sends a body of MAILROOM_MAX_BODY_BYTES, through the form and the API.
    publisher = user_with("add_message", "view_message", name="pat")
    _, key = create_token(user=publisher, name="uploads")
    body = "é" * (LETTER // 2)
    api = requests.post(base + "/api/messages/", json={"routing_key": queue_name, "body": body, "declare": True},
                        headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert api.status_code == 201, api.text
    session = requests.Session()
    login = session.get(base + "/accounts/login/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
    session.post(base + "/accounts/login/", data={"username": "pat", "password": "pw-for-tests",
                                                  "csrfmiddlewaretoken": token}, timeout=30)
    page = session.get(base + "/publish/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    form = session.post(base + "/publish/", data={**letter_form(queue_name, body), "csrfmiddlewaretoken": token},
                        headers={"Referer": base + "/publish/"}, timeout=60, allow_redirects=False)
    assert form.status_code == 302, form.text[:2000]
    assert [bytes(m.body) for m in Message.objects.all()] == [body.encode()] * 2
