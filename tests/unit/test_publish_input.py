"""The publish form and the HTTP API refuse bad input before anything is written, with a clear error.

No broker: `publish_once` (the broker step after the commit) is replaced by a stand-in that records
what it was given. SQLite in-process holds the users, tokens and letters.
"""
from __future__ import annotations

import json

import pytest

from messaging.models import Message
from messaging.outbox import publishing
from messaging.web.api import create_token

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(monkeypatch):
    """The letters handed to the broker step, which answers 'published' without a broker."""
    sent = []

    def publish_once(message, *, via=None):
        sent.append(message.message_id)
        return Message.Status.PUBLISHED, ""

    monkeypatch.setattr(publishing, "publish_once", publish_once)
    return sent


@pytest.fixture
def api_key(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("svc", password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    return create_token(user=user, name="unit")[1]


def post_api(client, payload, key):
    body = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
    return client.post("/api/messages/", body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}")


def form(**fields) -> dict:
    return {"mode": "queue", "queue": "unit-q", "body": "hello", "persistent": "on", "declare": "on",
            "content_type": "text/plain", "body_encoding": "string", **fields}


# --- the API --------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)  # the view's commit is a real one: the broker step runs after it
def test_a_good_letter_is_written_then_handed_to_the_broker_step(client, api_key, published):
    response = post_api(client, {"routing_key": "unit-q", "body": "hi", "headers": {"n": 1},
                                 "properties": {"priority": 3}}, api_key)
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["status"] == "published" and data["attempts"] == 1
    letter = Message.objects.get()
    assert letter.message_id == data["message_id"] and published == [letter.message_id]
    assert bytes(letter.body) == b"hi" and letter.headers == {"n": 1} and letter.properties == {"priority": 3}
    assert letter.status == Message.Status.PUBLISHED


@pytest.mark.parametrize("payload, fragment", [
    ("{not json", "The request body is not valid JSON"),
    ("[1, 2]", "The request body must be a JSON object"),
    ({"routing_key": "q", "colour": "red"}, "Unknown fields: colour"),
    ({"routing_key": "q", "body": 5}, "body must be a string"),
    ({"routing_key": "q", "body": "a", "body_base64": "YQ=="}, "either body or body_base64"),
    ({"routing_key": "q", "body_base64": "***"}, "not valid base64"),
    ({"routing_key": "q", "delivery_mode": 3}, "delivery_mode must be 1 (transient) or 2 (persistent)"),
    ({"routing_key": "q", "declare": "yes"}, "declare must be true or false"),
    ({"routing_key": ""}, "A queue name (routing key) is needed"),
    ({"routing_key": "é" * 128}, "The routing key is longer than 255 bytes"),
    ({"routing_key": "q", "headers": {"n": 2**64}}, "does not fit in 64 bits"),
    ({"routing_key": "q", "headers": {"h": "a\u0000b"}}, "NUL character"),
    ({"routing_key": "q", "properties": {"priority": 300}}, "priority must be a whole number from 0 to 255"),
    ({"routing_key": "q", "properties": {"colour": "red"}}, "Unknown property 'colour'"),
    ({"exchange": "amq.topic", "exchange_type": "topic", "declare": True, "routing_key": "k"}, "reserved"),
])
def test_bad_input_is_a_400_with_what_is_wrong_and_writes_nothing(client, api_key, published, payload, fragment):
    response = post_api(client, payload, api_key)
    assert response.status_code == 400, response.content
    assert fragment in response.json()["detail"]
    assert not Message.objects.exists() and published == []


def test_the_body_limit_is_a_400_too(client, api_key, published, settings):
    settings.MAILROOM_MAX_BODY_BYTES = 4
    response = post_api(client, {"routing_key": "q", "body": "12345"}, api_key)
    assert response.status_code == 400 and "the limit is 4 bytes" in response.json()["detail"]
    assert not Message.objects.exists() and published == []


@pytest.mark.django_db(transaction=True)
def test_a_used_message_id_is_a_409_and_the_first_letter_is_kept(client, api_key, published):
    assert post_api(client, {"routing_key": "q", "message_id": "same"}, api_key).status_code == 201
    retry = post_api(client, {"routing_key": "q", "message_id": "same"}, api_key)  # the same letter again
    assert retry.status_code == 200 and retry.json()["status"] == "published"
    again = post_api(client, {"routing_key": "q", "message_id": "same", "body": "other"}, api_key)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    assert list(Message.objects.values_list("message_id", flat=True)) == ["same"] and published == ["same"]


def test_no_token_or_a_wrong_one_is_a_401(client, published):
    assert client.post("/api/messages/", "{}", content_type="application/json").status_code == 401
    wrong = post_api(client, {"routing_key": "q"}, "mr_not-a-key")
    assert wrong.status_code == 401 and wrong["WWW-Authenticate"].startswith("Bearer")
    assert not Message.objects.exists()


# --- the form ---------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_good_form_is_written_then_handed_to_the_broker_step(publisher_client, published):
    response = publisher_client.post("/publish/", form(header_name_0="n", header_type_0="number",
                                                       header_value_0="1.5"))
    letter = Message.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/messages/{letter.message_id}/"
    assert published == [letter.message_id] and letter.headers == {"n": 1.5}
    assert letter.status == Message.Status.PUBLISHED and letter.attempts == 1


@pytest.mark.parametrize("fields, fragment", [
    ({"queue": ""}, "Name the queue."),
    ({"mode": "exchange", "exchange": ""}, "Name the exchange."),
    ({"queue": "é" * 128}, "longer than 255 bytes"),
    ({"headers": "{broken"}, "Headers are not valid JSON"),
    ({"headers": "[1]"}, "Headers must be a JSON object."),
    ({"body": "!!!", "body_encoding": "base64"}, "not valid base64"),
    ({"header_name_0": "n", "header_type_0": "number", "header_value_0": "many"}, "is not a number"),
    ({"header_name_0": "b", "header_type_0": "boolean", "header_value_0": "perhaps"}, "a boolean is true or false"),
    ({"headers": '{"n": 18446744073709551616}'}, "does not fit in 64 bits"),
    ({"priority": "256"}, "less than or equal to 255"),
    ({"expiration": "soon"}, "expiration must be a whole number of milliseconds"),
    ({"mode": "exchange", "exchange": "amq.fanout", "exchange_type": "fanout"}, "reserved"),
])
def test_a_bad_form_is_shown_again_with_the_error_and_writes_nothing(publisher_client, published, fields, fragment):
    response = publisher_client.post("/publish/", form(**fields))
    assert response.status_code == 200  # the form again, not a redirect to a letter
    page = response.content.decode()
    assert fragment in page.replace("&#x27;", "'").replace("&quot;", '"'), page[:2000]
    assert not Message.objects.exists() and published == []
