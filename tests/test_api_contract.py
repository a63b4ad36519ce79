"""The API's contract: Location, 415, the one error shape, the OpenAPI schema and its docs page."""
from __future__ import annotations

import contextlib
import json
import re
import threading
from urllib.parse import urlsplit

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.staticfiles import finders
from django.db import connection
from django.test import Client

from messaging.models import Message
from messaging.outbox import publishing
from messaging.web.api import create_token

pytestmark = pytest.mark.django_db(transaction=True)  # the publish step runs after the view's real commit


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def key():
    user = User.objects.create_user("svc", password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    return create_token(user=user, name="contract")[1]


@pytest.fixture
def outcome(monkeypatch):
    """The broker step's answer, chosen by the test (default: published); no broker is asked."""
    answer = {"status": Message.Status.PUBLISHED, "reason": ""}
    monkeypatch.setattr(publishing, "publish_once", lambda message, **_: (answer["status"], answer["reason"]))
    return answer


def post(client, body, key, content_type="application/json"):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post("/api/messages/", data, content_type=content_type, HTTP_AUTHORIZATION=f"Bearer {key}")


@pytest.mark.parametrize("message_id, path", [
    ("plain-1", "/api/messages/plain-1/"),
    ("a/b", "/api/messages/a%2Fb/"),
    ("../etc", "/api/messages/..%2Fetc/"),
    ("..", "/api/messages/%252E%252E/"),  # a browser resolves %2E%2E (messaging/web/links.py)
    (".", "/api/messages/%252E/"),
    ("sp ace?q=1#frag%", "/api/messages/sp%20ace%3Fq%3D1%23frag%25/"),
    ("two\nlines", "/api/messages/two%0Alines/"),
    ("é", "/api/messages/%C3%A9/"),
])
def test_location_is_the_letters_url_escaped_as_one_segment(client, key, outcome, message_id, path):
    response = post(client, {"routing_key": "q", "body": "x", "message_id": message_id}, key)
    assert response.status_code == 201, response.content
    assert response["Location"] == f"http://testserver{path}"
    trail = client.get(urlsplit(response["Location"]).path, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert trail.status_code == 200 and trail.json()["message_id"] == message_id


def test_location_on_202_and_on_the_retrys_200(client, key, outcome):
    outcome.update(status=Message.Status.PENDING, reason="broker down (test)")
    first = post(client, {"routing_key": "q", "body": "x", "message_id": "later"}, key)
    assert first.status_code == 202 and first.json()["status"] == "pending" and first.json()["next_attempt_at"]
    again = post(client, {"routing_key": "q", "body": "x", "message_id": "later"}, key)
    assert again.status_code == 200 and again["Location"] == first["Location"] == "http://testserver/api/messages/later/"
    assert again.json()["attempts"] == 1  # the first letter as it is now; nothing published again


def test_two_identical_posts_at_once_write_one_letter_and_both_get_it(key, outcome, monkeypatch):
    """Both requests pass the "already used?" check together; the unique constraint decides, the loser re-reads.
    (SQLite lets one writer in at a time: there the barrier times out and the second request finds the letter.)"""
    barrier = threading.Barrier(2, timeout=2)
    built = publishing.new_message

    def new_message_together(**fields):
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        return built(**fields)

    monkeypatch.setattr(publishing, "new_message", new_message_together)
    answers = []

    def send():
        try:
            answers.append(post(Client(), {"routing_key": "q", "body": "x", "message_id": "at-once"}, key))
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(a.status_code for a in answers) == [200, 201], [a.content for a in answers]
    assert answers[0].json() == answers[1].json() and Message.objects.count() == 1


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", '{"routing_key": "q", "body": "x"}'),
    ("application/x-www-form-urlencoded", "routing_key=q&body=x"),
    ("multipart/form-data; boundary=B", '--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nq\r\n--B--\r\n'),
    ("", '{"routing_key": "q", "body": "x"}'),
])
def test_a_body_that_is_not_json_is_415(client, key, outcome, content_type, body):
    response = post(client, body, key, content_type=content_type)
    assert response.status_code == 415, response.content
    assert response.json() == {"detail": "Send the letter as application/json.", "code": "unsupported_media_type"}
    assert not Message.objects.exists()


@pytest.mark.parametrize("request_args, status, code", [
    ({"body": {"routing_key": "q", "colour": "red"}}, 400, "invalid"),
    ({"body": "{broken"}, 400, "parse_error"),
    ({"body": {"routing_key": "q"}, "key": "mr_wrong"}, 401, "authentication_failed"),
])
def test_errors_of_a_post_have_one_shape(client, key, outcome, request_args, status, code):
    response = post(client, request_args["body"], request_args.get("key", key))
    assert response.status_code == status and response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"detail", "code"} and body["code"] == code and body["detail"]


def test_errors_elsewhere_have_the_same_shape(client, key, settings):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    missing = client.get("/api/messages/nope/", **auth)
    assert missing.status_code == 404 and missing.json() == {"detail": "No letter with this message_id.",
                                                             "code": "not_found"}
    put = client.put("/api/messages/", "{}", content_type="application/json", **auth)
    assert put.status_code == 405
    assert put.json() == {"detail": 'Method "PUT" not allowed.', "code": "method_not_allowed"}
    settings.MAILROOM_MAX_BODY_BYTES = 100  # the request's limit is then Django's DATA_UPLOAD_MAX_MEMORY_SIZE
    large = post(client, {"routing_key": "q", "body": "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE}, key)
    assert large.status_code == 413 and large.json()["code"] == "too_large"
    nul = client.get("/api/messages/", {"queue": "a\x00b"}, **auth)  # answered before any view
    assert nul.status_code == 400 and nul.json() == {"detail": "A query parameter holds a NUL character.",
                                                     "code": "invalid"}
    html = client.get("/api/messages/nope/", HTTP_ACCEPT="text/html", **auth)  # JSON whatever Accept says
    assert html.status_code == 404 and html["Content-Type"] == "application/json"


def test_an_unexpected_error_is_a_500_in_the_same_shape(key, monkeypatch, caplog):
    from messaging.web.api import views

    def broken(*args, **kwargs):
        raise RuntimeError("the database caught fire")

    Message.objects.create(routing_key="q", body=b"x")  # a row for the broken function to fail on
    monkeypatch.setattr(views, "message_row", broken)
    response = Client(raise_request_exception=False).get("/api/messages/", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 500
    assert response.json() == {"detail": "An unexpected error occurred.", "code": "server_error"}
    assert "caught fire" not in response.content.decode() and "caught fire" in caplog.text


def test_the_openapi_schema_is_public_and_documents_the_api(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200 and response["Content-Type"].startswith("application/vnd.oai.openapi+json")
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert set(schema["paths"]) == {"/api/messages/", "/api/messages/{message_id}/", "/api/dead-letters/",
                                    "/api/dead-letters/{queue}/"}
    dead_letters = schema["paths"]["/api/dead-letters/{queue}/"]["get"]
    assert {p["name"] for p in dead_letters["parameters"]} == {"queue", "original", "reason", "count"}
    assert set(dead_letters["responses"]) >= {"200", "400", "404", "409", "503"}
    listing, create = schema["paths"]["/api/messages/"]["get"], schema["paths"]["/api/messages/"]["post"]
    assert {p["name"] for p in listing["parameters"]} >= {"status", "queue", "exchange", "routing_key", "since",
                                                          "until", "cursor", "page_size"}
    assert set(create["responses"]) >= {"200", "201", "202", "400", "401", "403", "409", "413", "415", "500"}
    assert "Location" in create["responses"]["201"]["headers"]
    error = {"$ref": "#/components/schemas/Error"}
    assert create["responses"]["415"]["content"]["application/json"]["schema"] == error
    assert set(schema["components"]["securitySchemes"]) == {"bearerAuth", "cookieAuth"}


def test_the_docs_page_loads_its_assets_from_this_site_without_inline_script(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "<style" not in html and not re.search(r"<script(?![^>]*\bsrc=)", html)  # the CSP allows neither
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert all(not s.startswith(("http:", "https:", "//")) for s in sources), sources
    for static in (s for s in sources if s.startswith("/static/")):
        assert finders.find(static.removeprefix("/static/")), static
    script = client.get(next(s for s in sources if "script" in s).replace("&amp;", "&"))
    assert script.status_code == 200 and "/api/openapi.json" in script.content.decode()
    assert "script-src 'self'" in page["Content-Security-Policy"]


def test_the_host_projects_rest_framework_settings_change_nothing(client, key, outcome, settings, monkeypatch):
    """The app installs into other projects: its views set every policy themselves, and publish after their own commit."""
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    settings.REST_FRAMEWORK = {
        "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.BasicAuthentication"],
        "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
        "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.BrowsableAPIRenderer"],
        "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.FormParser"],
        "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination", "PAGE_SIZE": 1,
        "DEFAULT_VERSIONING_CLASS": "rest_framework.versioning.QueryParameterVersioning",
        "EXCEPTION_HANDLER": "rest_framework.views.exception_handler",
        "DEFAULT_SCHEMA_CLASS": "rest_framework.schemas.openapi.AutoSchema",
    }
    created = post(client, {"routing_key": "q", "body": "x"}, key)
    assert created.status_code == 201 and created["Content-Type"] == "application/json"
    post(client, {"routing_key": "q", "body": "y"}, key)
    listing = client.get("/api/messages/", HTTP_AUTHORIZATION=f"Bearer {key}").json()
    assert len(listing["results"]) == 2 and set(listing) == {"next", "previous", "results"}
    anonymous = client.get("/api/messages/")
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "not_authenticated"
    assert "/api/messages/" in client.get("/api/openapi.json").json()["paths"]
