"""GET /api/messages/: newest first, filters, the cursor's pages, permissions; errors in the API's one shape."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from messaging.models import Message
from messaging.web.api import create_token
from tests.audit_data import delivery, letter

pytestmark = pytest.mark.django_db

START = timezone.now().replace(microsecond=0) - timedelta(days=1)


def key_for(*codenames: str, name: str = "reader") -> str:
    user = User.objects.create_user(name, password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return create_token(user=user, name=name)[1]


@pytest.fixture
def reader():
    return key_for("view_message")


@pytest.fixture
def letters():
    """Six letters a minute apart (m0 oldest): two exchanges, two statuses, deliveries on two queues."""
    made = []
    for i in range(6):
        made.append(letter(
            message_id=f"m{i}", created_at=START + timedelta(minutes=i),
            exchange="orders" if i % 2 else "", routing_key="created" if i % 2 else "work",
            status=Message.Status.FAILED if i in (1, 4) else Message.Status.PUBLISHED,
        ))
    for i in (0, 3, 4):
        delivery(made[i], queue="billing")
    delivery(made[4], queue="audit")
    delivery(made[4], queue="billing", attempt=2)  # twice on one queue: listed once
    return made


def ids(client, key, **params):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    response = client.get("/api/messages/", params, **headers)
    assert response.status_code == 200, response.content
    return [row["message_id"] for row in response.json()["results"]]


def test_newest_first_with_each_row_in_full(client, reader, letters):
    response = client.get("/api/messages/", HTTP_AUTHORIZATION=f"Bearer {reader}")
    body = response.json()
    assert [r["message_id"] for r in body["results"]] == ["m5", "m4", "m3", "m2", "m1", "m0"]
    assert body["next"] is None and body["previous"] is None and "count" not in body
    row = body["results"][0]
    assert row == {
        "message_id": "m5", "status": "published", "last_error": "", "attempts": 0, "next_attempt_at": None,
        "exchange": "orders", "routing_key": "created", "body_size": 5, "body_sha256": letters[5].body_sha256,
        "created_at": (START + timedelta(minutes=5)).isoformat(), "published_at": letters[5].published_at.isoformat(),
    }


@pytest.mark.parametrize("params, expected", [
    ({"status": "failed"}, ["m4", "m1"]),
    ({"queue": "billing"}, ["m4", "m3", "m0"]),
    ({"queue": "audit"}, ["m4"]),
    ({"queue": "nobody"}, []),
    ({"exchange": "orders"}, ["m5", "m3", "m1"]),
    ({"exchange": ""}, ["m4", "m2", "m0"]),  # the default exchange
    ({"routing_key": "work"}, ["m4", "m2", "m0"]),
    ({"since": (START + timedelta(minutes=4)).isoformat()}, ["m5", "m4"]),  # inclusive
    ({"until": (START + timedelta(minutes=2)).isoformat()}, ["m1", "m0"]),  # exclusive
    ({"status": "failed", "queue": "billing", "since": START.isoformat()}, ["m4"]),
])
def test_each_filter(client, reader, letters, params, expected):
    assert ids(client, reader, **params) == expected


def test_pages_follow_the_next_cursor_without_gaps_or_repeats(client, reader, letters):
    for i in range(6, 12):  # the same created_at as m5: the cursor still keeps its place
        letter(message_id=f"m{i}", created_at=START + timedelta(minutes=5))
    seen, url, pages = [], "/api/messages/?page_size=4", 0
    while url:
        response = client.get(url, HTTP_AUTHORIZATION=f"Bearer {reader}")
        assert response.status_code == 200, response.content
        body = response.json()
        assert len(body["results"]) <= 4
        seen += [row["message_id"] for row in body["results"]]
        url, pages = body["next"], pages + 1
    assert pages == 3 and len(seen) == 12 and len(set(seen)) == 12
    assert seen[-5:] == ["m4", "m3", "m2", "m1", "m0"]


def test_the_page_size_is_capped(client, reader, letters, monkeypatch):
    from messaging.web.api.policies import MessagePagination

    monkeypatch.setattr(MessagePagination, "max_page_size", 2)
    assert ids(client, reader, page_size=1000) == ["m5", "m4"]


def test_the_list_counts_nothing(client, reader, letters, django_assert_max_num_queries):
    """Cursor pagination: the token, its last_used_at, the user's permissions, then one bounded SELECT; no COUNT."""
    with django_assert_max_num_queries(5) as queries:
        assert ids(client, reader, status="published", page_size=2) == ["m5", "m3"]
    sql = " ".join(q["sql"] for q in queries.captured_queries).upper()
    assert "COUNT(" not in sql and "LIMIT 3" in sql


@pytest.mark.parametrize("params, field", [
    ({"status": "lost"}, "status"), ({"since": "yesterday"}, "since"), ({"cursor": "not-a-cursor"}, "cursor"),
    ({"queue": "q" * 256}, "queue"),
])
def test_bad_parameters_are_400_by_field(client, reader, params, field):
    response = client.get("/api/messages/", params, HTTP_AUTHORIZATION=f"Bearer {reader}")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid" and list(body["errors"]) == [field] and field in body["detail"]


def test_reading_needs_view_message_and_credentials(client, letters):
    publisher_only = key_for("add_message", name="publisher")
    denied = client.get("/api/messages/", HTTP_AUTHORIZATION=f"Bearer {publisher_only}")
    assert denied.status_code == 403
    assert denied.json() == {"detail": "Permission messaging.view_message required.", "code": "permission_denied"}
    anonymous = client.get("/api/messages/")
    assert anonymous.status_code == 401 and anonymous["WWW-Authenticate"] == 'Bearer realm="mailroom"'
    assert anonymous.json()["code"] == "not_authenticated"
    wrong = client.get("/api/messages/", HTTP_AUTHORIZATION="Bearer mr_nope")
    assert wrong.status_code == 401 and wrong.json() == {"detail": "Invalid or unknown API token.",
                                                          "code": "authentication_failed"}
    user = User.objects.create_user("browser", password="pw-for-tests")
    user.user_permissions.add(Permission.objects.get(codename="view_message"))
    client.force_login(user)  # the session reads too
    assert ids(client, None, status="failed") == ["m4", "m1"]
