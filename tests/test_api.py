"""The HTTP API: bearer tokens, permissions, CSRF for sessions, the outbox path, a letter's trail."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from messaging.models import ApiToken, Delivery, Message
from messaging.web.api import create_token, hash_key
from tests.conftest import ROOT, queue_depth, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

BINARY = bytes(range(256)) + b"\x00" * 3


def user_with(*codenames: str, name: str = "svc") -> User:
    user = User.objects.create_user(name, password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def service():
    """A bearer key for a user allowed to publish and read letters."""
    _, key = create_token(user=user_with("add_message", "view_message"), name="billing")
    return key


def post(client, payload, *, key: str | None = None, **extra):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    body = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
    return client.post("/api/messages/", body, content_type="application/json", **headers, **extra)


def test_publish_with_a_token_and_read_the_trail(client, service, queue_name, manage):
    response = post(client, {"exchange": "", "routing_key": queue_name, "body": "hello", "declare": True,
                             "headers": {"x-n": 1, "ok": True}, "properties": {"priority": 3, "app_id": "billing"}},
                    key=service)
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["status"] == "published"
    letter = Message.objects.get(message_id=data["message_id"])
    assert letter.origin == Message.Origin.API and letter.published_by.username == "svc"
    assert letter.properties == {"priority": 3, "app_id": "billing"} and letter.headers == {"x-n": 1, "ok": True}

    worker = manage("consume", queue_name, "--max-messages", "1", "--inactivity-timeout", "20")
    assert worker.wait(timeout=60) == 0, worker.output
    trail = client.get(f"/api/messages/{data['message_id']}/", HTTP_AUTHORIZATION=f"Bearer {service}")
    assert trail.status_code == 200
    body = trail.json()
    assert body["message_id"] == data["message_id"] and body["status"] == "published"
    assert len(body["deliveries"]) == 1
    delivery = body["deliveries"][0]
    assert delivery["queue"] == queue_name and delivery["status"] == Delivery.Status.ACKED
    assert delivery["redelivered"] is False and delivery["received_at"] and delivery["settled_at"]
    assert ApiToken.objects.get().last_used_at is not None


def test_base64_body_round_trips_byte_for_byte(client, service, amqp, queue_name):
    response = post(client, {"routing_key": queue_name, "declare": True,
                             "body_base64": base64.b64encode(BINARY).decode()}, key=service)
    assert response.status_code == 201, response.content
    assert bytes(Message.objects.get(message_id=response.json()["message_id"]).body) == BINARY
    assert amqp.basic_get(queue_name, auto_ack=True)[2] == BINARY


def test_unroutable_and_missing_exchange_are_answered_with_their_outcome(client, service, queue_name):
    unroutable = post(client, {"routing_key": f"{queue_name}-nobody", "body": "x"}, key=service)
    assert unroutable.status_code == 201 and unroutable.json()["status"] == "unroutable"
    failed = post(client, {"exchange": f"{queue_name}-missing", "routing_key": "k", "body": "x"}, key=service)
    assert failed.status_code == 201 and failed.json()["status"] == "failed" and "404" in failed.json()["last_error"]


@pytest.mark.parametrize("payload, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"routing_key": "q", "body_base64": "%%%"}, "base64"),
    ({"routing_key": "q", "body": "x", "body_base64": "eA=="}, "either body or body_base64"),
    ({"routing_key": "é" * 128, "body": "x"}, "255 bytes"),
    ({"routing_key": "q", "exchange": "amq.topic", "exchange_type": "topic", "declare": True}, "amq.*"),
    ({"routing_key": "q", "body": 5}, "body must be a string"),
    ({"routing_key": "q", "colour": "blue"}, "Unknown fields"),
    ({"routing_key": "q", "properties": {"priority": "high"}}, "priority"),
    ({"routing_key": "q", "headers": ["not", "an", "object"]}, "JSON objects"),
    # Lone surrogates (JSON's \\ud800 escapes), NUL (PostgreSQL refuses it in text), nesting, types
    ({"routing_key": "q\ud800", "body": "x"}, "not valid Unicode"),
    ({"routing_key": "q", "body": "\ud800"}, "not valid Unicode"),
    ({"routing_key": "q", "body": "x", "headers": {"\ud800": 1}}, "not valid Unicode"),
    pytest.param("[" * 100_000 + "]" * 100_000, "not valid JSON", id="nested-100000-deep"),
    ({"routing_key": "q", "body": "x", "headers": {"deep": json.loads("[" * 50 + "]" * 50)}}, "nested too deeply"),
    ({"routing_key": "q\x00", "body": "x"}, "NUL"),
    ({"routing_key": "q", "exchange": "e\x00", "body": "x"}, "NUL"),
    ({"routing_key": "q", "body": "x", "message_id": "m\x00"}, "NUL"),
    ({"routing_key": "q", "body": "x", "content_type": "text/\x00"}, "NUL"),
    ({"routing_key": "q", "body": "x", "properties": {"app_id": "\x00"}}, "NUL"),
    ({"routing_key": "q", "body": "x", "headers": {"\x00" * 43: 1}}, "NUL"),
    ({"routing_key": "q", "body": "x", "headers": {"h": "a\x00b"}}, "NUL"),
    ({"routing_key": "q", "body": "x", "headers": {"t": {"l": ["ok", "a\x00b"]}}}, "NUL"),
    # One AMQP frame carries the properties: the broker would close the connection (501) for more
    ({"routing_key": "q", "body": "x", "headers": {"h": "A" * 130_000}}, "fit in the AMQP frame"),
    ({"routing_key": "q", "body": "x", "properties": {"expiration": "1" * 256}}, "255 bytes"),
    ({"routing_key": "q", "body": "x", "delivery_mode": 2.0}, "delivery_mode"),
    ({"routing_key": "q", "body": "x", "delivery_mode": True}, "delivery_mode"),
    ({"routing_key": "q", "body": "x", "exchange": "e", "exchange_type": "x" * 20}, "Unknown exchange type"),
    ('{"routing_key": "q", "body": "x", "headers": {"n": NaN}}', "finite"),  # json.loads reads NaN
])
def test_invalid_payloads_are_400_and_write_nothing(client, service, payload, fragment):
    response = post(client, payload, key=service)
    assert response.status_code == 400, response.content
    assert fragment in response.json()["detail"]
    assert not Message.objects.exists()


def test_body_over_the_limit_is_400(client, service, settings):
    settings.MAILROOM_MAX_BODY_BYTES = 100
    response = post(client, {"routing_key": "q", "body": "x" * 101}, key=service)
    assert response.status_code == 400 and "limit is 100 bytes" in response.json()["detail"]


def test_a_request_over_the_upload_limit_is_413_in_json(client, service, settings):
    settings.MAILROOM_MAX_BODY_BYTES = 100  # the limit is then Django's DATA_UPLOAD_MAX_MEMORY_SIZE
    response = post(client, {"routing_key": "q", "body": "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE}, key=service)
    assert response.status_code == 413
    assert f"over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes" in response.json()["detail"]
    assert not Message.objects.exists()


def test_a_retry_with_the_same_content_answers_the_first_letter_and_other_content_is_409(client, service, queue_name):
    payload = {"routing_key": queue_name, "body": "x", "declare": True, "message_id": "api-dup",
               "headers": {"n": 1}, "properties": {"priority": 3}}
    first = post(client, payload, key=service)
    assert first.status_code == 201, first.content
    again = post(client, payload, key=service)
    assert again.status_code == 200 and again.json() == first.json()
    assert again["Location"] == first["Location"]
    for change in ({"body": "y"}, {"headers": {"n": True}}, {"properties": {"priority": 4}}, {"declare": False},
                   {"routing_key": f"{queue_name}-other"}, {"delivery_mode": 1}, {"correlation_id": "c"}):
        other = post(client, {**payload, **change}, key=service)
        assert other.status_code == 409, change
        assert other.json()["code"] == "conflict" and "already exists" in other.json()["detail"]
    _, colleague = create_token(user=user_with("add_message", name="colleague"), name="other service")
    assert post(client, payload, key=colleague).status_code == 409  # another sender's letter
    assert Message.objects.count() == 1 and queue_depth(queue_name)[0] == 1


def test_authentication_and_permissions(client, queue_name):
    payload = {"routing_key": queue_name, "body": "x", "declare": True}
    no_token = post(client, payload)
    assert no_token.status_code == 401 and no_token["WWW-Authenticate"].startswith("Bearer")
    assert post(client, payload, key="mr_not-a-real-key").status_code == 401
    assert client.post("/api/messages/", "{}", content_type="application/json",
                       HTTP_AUTHORIZATION="Basic Z3Vlc3Q6Z3Vlc3Q=").status_code == 401
    _, reader_key = create_token(user=user_with("view_message", name="reader"), name="read-only")
    assert post(client, payload, key=reader_key).status_code == 403
    _, nobody_key = create_token(user=user_with(name="nobody"), name="nothing")
    assert client.get("/api/messages/whatever/", HTTP_AUTHORIZATION=f"Bearer {nobody_key}").status_code == 403
    inactive = user_with("add_message", name="gone")
    _, inactive_key = create_token(user=inactive, name="old")
    inactive.is_active = False
    inactive.save()
    assert post(client, payload, key=inactive_key).status_code == 401
    assert not Message.objects.exists()
    assert queue_depth_or_none(queue_name) is None  # nothing declared, nothing published


def queue_depth_or_none(name):
    try:
        return queue_depth(name)
    except Exception:  # noqa: BLE001 — the queue does not exist
        return None


def test_session_use_keeps_csrf(queue_name):
    user = user_with("add_message", "view_message", name="browser")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    payload = json.dumps({"routing_key": queue_name, "body": "x", "declare": True})
    assert browser.post("/api/messages/", payload, content_type="application/json").status_code == 403
    assert not Message.objects.exists()
    browser.get("/publish/")  # sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    ok = browser.post("/api/messages/", payload, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert ok.status_code == 201, ok.content
    read = browser.get(f"/api/messages/{ok.json()['message_id']}/")
    assert read.status_code == 200 and read.json()["status"] == "published"
    assert Client().get(f"/api/messages/{ok.json()['message_id']}/").status_code == 401


def test_session_post_as_a_form_is_415_in_json(queue_name):
    """A browser form (multipart) is read by the CSRF check as a form: the body is then gone, and the
    answer says which format to use (not a 500)."""
    browser = Client(enforce_csrf_checks=True, raise_request_exception=False)
    browser.force_login(user_with("add_message", "view_message", name="browser"))
    browser.get("/publish/")  # sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    response = browser.post("/api/messages/", {"routing_key": queue_name, "body": "x", "csrfmiddlewaretoken": token})
    assert response.status_code == 415, response.content[:300]
    assert response.json() == {"detail": "Send the letter as application/json.", "code": "unsupported_media_type"}
    assert not Message.objects.exists()


def test_unknown_letter_is_404(client, service):
    assert client.get("/api/messages/nope/", HTTP_AUTHORIZATION=f"Bearer {service}").status_code == 404
    assert client.get("/api/messages/a%00b/", HTTP_AUTHORIZATION=f"Bearer {service}").status_code == 404


def test_a_message_id_with_a_newline_has_its_pages(client, service, queue_name):
    """Other producers choose message_ids freely: a newline must not break a page that links the letter."""
    response = post(client, {"routing_key": queue_name, "body": "x", "declare": True, "message_id": "two\nlines"},
                    key=service)
    assert response.status_code == 201, response.content
    trail = client.get("/api/messages/two%0Alines/", HTTP_AUTHORIZATION=f"Bearer {service}")
    assert trail.status_code == 200 and trail.json()["message_id"] == "two\nlines"
    client.force_login(user_with("view_message", name="reader"))
    assert client.get("/").status_code == 200
    for path in ("/messages/", "/messages/?q=two%0Alines"):  # each links the letter's page
        page = client.get(path)
        assert page.status_code == 200 and "/messages/two%0Alines/" in page.content.decode(), path
    page = client.get("/messages/two%0Alines/")
    assert page.status_code == 200 and "two\nlines" in page.content.decode()
    # NUL is in no stored id or name (and PostgreSQL refuses it in a query): not found, or a clear 400.
    assert client.get("/messages/a%00b/").status_code == 404
    for query in ({"q": "a\x00b"}, {"queue": "a\x00b"}):
        page = client.get("/messages/", query)
        assert page.status_code == 400 and b"NUL" in page.content


def test_pages_need_the_view_permission(client):
    """Bodies are read on the pages as in the API: only with messaging.view_message (both roles have it)."""
    client.force_login(user_with(name="no-role"))
    for path in ("/", "/messages/", "/messages/anything/", "/queues/"):
        assert client.get(path).status_code == 403, path
    client.force_login(user_with("view_message", name="reader"))
    for path in ("/", "/messages/", "/queues/"):
        assert client.get(path).status_code == 200, path
    assert client.get("/messages/anything/").status_code == 404


def test_create_api_token_command_stores_only_the_hash(django_user_model):
    django_user_model.objects.create_user("ops", password="pw-for-tests")
    out = subprocess.run([sys.executable, str(ROOT / "manage.py"), "create_api_token", "ops", "--name", "cron"],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    token = ApiToken.objects.get(name="cron")
    assert token.key_sha256 == hash_key(key) and key not in token.key_sha256
    missing = subprocess.run([sys.executable, str(ROOT / "manage.py"), "create_api_token", "nobody", "--name", "x"],
                             cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "No user" in missing.stderr
