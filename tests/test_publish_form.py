"""The publish form: every field of the management UI's form and more, clear errors (never a 500), republish."""
from __future__ import annotations

import base64
import uuid

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from messaging.models import Message
from tests.audit_data import letter
from tests.conftest import management_url

pytestmark = pytest.mark.django_db(transaction=True)

BINARY = bytes(range(256)) + b"\x00\xfe"


def form(queue: str, **fields) -> dict:
    return {"mode": "queue", "queue": queue, "body": "hello", "persistent": "on", "declare": "on",
            "content_type": "text/plain", "body_encoding": "string", **fields}


def test_every_property_typed_headers_and_base64_body_arrive(publisher_client, amqp, queue_name):
    response = publisher_client.post("/publish/", form(
        queue_name, body=base64.b64encode(BINARY).decode(), body_encoding="base64",
        content_type="application/octet-stream", content_encoding="gzip", priority="7", correlation_id="c-1",
        reply_to="answers", expiration="5000", message_id=f"form-{uuid.uuid4().hex}", timestamp="1700000000",
        type="invoice", user_id="guest", app_id="shop", persistent="",
        header_name_0="count", header_type_0="number", header_value_0="42",
        header_name_1="urgent", header_type_1="boolean", header_value_1="true",
        header_name_2="tags", header_type_2="list", header_value_2='["a", 1]',
        header_name_3="who", header_type_3="string", header_value_3="<b>me</b>",
        headers='{"json-header": 2.5}',
    ))
    assert response.status_code == 302, response.content.decode()[:3000]
    letter = Message.objects.get()
    assert letter.status == Message.Status.PUBLISHED, letter.last_error
    assert bytes(letter.body) == BINARY and letter.delivery_mode == 1
    method, props, body = amqp.basic_get(queue_name, auto_ack=True)
    assert body == BINARY and props.message_id == letter.message_id
    assert props.headers == {"count": 42, "urgent": True, "tags": ["a", 1], "who": "<b>me</b>",
                             "json-header": __import__("decimal").Decimal("2.5")}
    assert (props.priority, props.correlation_id, props.reply_to, props.expiration) == (7, "c-1", "answers", "5000")
    assert (props.timestamp, props.type, props.user_id, props.app_id) == (1700000000, "invoice", "guest", "shop")
    assert (props.content_type, props.content_encoding, props.delivery_mode) == ("application/octet-stream", "gzip", 1)


@pytest.mark.parametrize("fields, fragment", [
    ({"queue": "é" * 128}, "longer than 255 bytes"),
    ({"mode": "exchange", "exchange": "x" * 256, "routing_key": "k"}, "longer than 255 bytes"),
    ({"mode": "exchange", "exchange": "e", "routing_key": "ü" * 200}, "longer than 255 bytes"),
    ({"headers": "{broken"}, "not valid JSON"),
    ({"headers": "[1]"}, "JSON object"),
    ({"headers": '{"' + "h" * 256 + '": 1}'}, "Header name"),
    ({"body": "!!!", "body_encoding": "base64"}, "not valid base64"),
    ({"mode": "exchange", "exchange": "amq.fanout", "exchange_type": "fanout"}, "reserved"),
    ({"header_name_0": "n", "header_type_0": "number", "header_value_0": "many"}, "is not a number"),
    ({"header_name_0": "b", "header_type_0": "boolean", "header_value_0": "perhaps"}, "a boolean is true or false"),
    ({"header_name_0": "l", "header_type_0": "list", "header_value_0": "{}"}, "JSON array"),
    ({"priority": "256"}, "less than or equal to 255"),
    ({"expiration": "tomorrow"}, "milliseconds"),
    ({"mode": "exchange", "exchange": ""}, "Name the exchange"),
    ({"queue": ""}, "Name the queue"),
])
def test_invalid_input_is_a_form_error_and_writes_nothing(publisher_client, fields, fragment):
    response = publisher_client.post("/publish/", {**form("q-invalid"), **fields})
    assert response.status_code == 200
    assert fragment in response.content.decode()
    assert not Message.objects.exists()


def test_body_over_the_limit_is_a_form_error(publisher_client, settings):
    settings.MAILROOM_MAX_BODY_BYTES = 10
    response = publisher_client.post("/publish/", form("q-big", body="x" * 11))
    assert response.status_code == 200 and "limit is 10 bytes" in response.content.decode()
    assert not Message.objects.exists()


def test_existing_amq_exchange_without_declare_is_published_to(publisher_client, queue_name):
    response = publisher_client.post("/publish/", form(queue_name, mode="exchange", exchange="amq.direct",
                                                routing_key=f"{queue_name}-unbound", declare=""))
    assert response.status_code == 302
    assert Message.objects.get().status == Message.Status.UNROUTABLE  # amq.direct exists; no binding


def test_duplicate_message_id_is_a_form_error(publisher_client, queue_name):
    assert publisher_client.post("/publish/", form(queue_name, message_id="same")).status_code == 302
    response = publisher_client.post("/publish/", form(queue_name, message_id="same"))
    assert response.status_code == 200 and "already exists" in response.content.decode()
    assert Message.objects.count() == 1


def test_routing_preview_button_shows_queues_and_writes_nothing(publisher_client, settings, amqp, queue_name):
    settings.RABBITMQ_MANAGEMENT_URL = management_url()
    exchange = f"t-form-preview-{uuid.uuid4().hex[:8]}"
    amqp.exchange_declare(exchange, exchange_type="direct")
    try:
        amqp.queue_declare(queue_name, durable=True)
        amqp.queue_bind(queue_name, exchange, routing_key="blue")
        fields = {"mode": "exchange", "exchange": exchange, "exchange_type": "direct", "declare": "", "preview": "1"}
        reach = publisher_client.post("/publish/", form(queue_name, routing_key="blue", **fields)).content.decode()
        assert f"reaches queues {queue_name}" in reach
        nowhere = publisher_client.post("/publish/", form(queue_name, routing_key="red", **fields)).content.decode()
        assert "no queue is bound: it would be returned" in nowhere
    finally:
        amqp.exchange_delete(exchange)
    assert not Message.objects.exists()


def test_form_page_has_no_inline_script(publisher_client):
    page = publisher_client.get("/publish/").content.decode()
    assert "messaging/publish.js" in page and "<script>" not in page
    for field in ("priority", "reply_to", "expiration", "timestamp", "user_id", "app_id", "header_type_0",
                  "body_encoding", "exchange_type", "content_encoding", "correlation_id", "message_id", "type"):
        assert f'name="{field}"' in page


def test_anonymous_and_unprivileged_users_cannot_publish(client, queue_name):
    assert client.post("/publish/", form(queue_name)).status_code == 302  # to the login page
    User.objects.create_user("viewer", password="pw-for-tests")
    client.login(username="viewer", password="pw-for-tests")
    assert client.post("/publish/", form(queue_name)).status_code == 403
    assert client.post(reverse("message-republish", args=["anything"])).status_code == 403
    assert not Message.objects.exists()


def test_republish_from_the_letter_page_asks_first_and_records_lineage(publisher_client, amqp, queue_name):
    publisher_client.post("/publish/", form(queue_name, body="again"))
    original = Message.objects.get()
    confirm = publisher_client.get(reverse("message-republish", args=[original.message_id]))
    assert confirm.status_code == 200 and "Republish" in confirm.content.decode()
    assert Message.objects.count() == 1  # asking writes nothing
    response = publisher_client.post(reverse("message-republish", args=[original.message_id]))
    copy = Message.objects.exclude(pk=original.pk).get()
    assert response.status_code == 302 and response["Location"] == f"/messages/{copy.message_id}/"
    assert copy.republished_from == original and copy.published_by.username == "pat"
    assert copy.origin == Message.Origin.REPUBLISH and copy.status == Message.Status.PUBLISHED
    assert [amqp.basic_get(queue_name, auto_ack=True)[2] for _ in range(2)] == [b"again", b"again"]
    assert publisher_client.get(f"/messages/{copy.message_id}/").status_code == 200


def test_a_message_id_ending_in_republish_has_its_own_page(publisher_client, amqp, queue_name):
    """message_ids may hold "/": the page of letter "x/republish" is that letter's, not the republish page of "x"."""
    amqp.queue_declare(queue_name, durable=True)
    slashed = letter(message_id="x/republish", routing_key=queue_name)
    plain = letter(message_id="x", routing_key=queue_name)
    page = publisher_client.get(reverse("message-detail", args=[slashed.message_id]))
    assert page.status_code == 200 and page.context["message"] == slashed, page.templates[0].name
    assert publisher_client.post(reverse("message-detail", args=[slashed.message_id])).status_code == 200
    assert Message.objects.count() == 2  # a POST to a letter's page republishes nothing
    response = publisher_client.post(reverse("message-republish", args=[plain.message_id]))
    copy = Message.objects.exclude(pk__in=[slashed.pk, plain.pk]).get()
    assert response.status_code == 302 and copy.republished_from == plain


def test_republish_needs_the_view_permission_too(client, queue_name):
    """Republishing shows and re-sends a letter: a user who may publish but not read letters may not."""
    original = letter(routing_key=queue_name)
    user = User.objects.create_user("sender", password="pw-for-tests")
    user.user_permissions.add(Permission.objects.get(codename="add_message"))
    client.force_login(user)
    url = reverse("message-republish", args=[original.message_id])
    assert client.get(url).status_code == 403
    assert client.post(url).status_code == 403
    assert Message.objects.count() == 1
