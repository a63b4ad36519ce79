"""A trail nobody can forge: another body under a letter's message_id, on a queue it was never routed to,
is marked and kept; two different raw message_ids never become one letter (issue #22)."""
from __future__ import annotations

import hashlib
import json
import uuid

import pika
import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from messaging.amqp.codec import ID_DIGEST_MARK, stored_message_id
from messaging.consumer.recording import Received, record_batch, record_refused
from messaging.models import Delivery, Message
from messaging.web.api import create_token
from tests.conftest import delete_queue, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

FORGED = b"<script>alert('forged')</script> pay 1,000,000 to mallory"


@pytest.fixture
def two_queues(amqp):
    """Two durable queues of this test's own (A, B); deleted afterwards."""
    names = [f"t-forgery-{side}-{uuid.uuid4().hex[:8]}" for side in "ab"]
    for name in names:
        amqp.queue_declare(queue=name, durable=True)
    yield names
    for name in names:
        delete_queue(name)


@pytest.fixture
def service():
    """A bearer key for a user allowed to publish and read letters."""
    user = User.objects.create_user("svc", password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    return create_token(user=user, name="billing")[1]


def api_publish(client, key: str, **payload) -> dict:
    response = client.post("/api/messages/", json.dumps(payload), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 201, response.content
    return response.json()


def consume(manage, *queues: str, messages: int) -> None:
    worker = manage("consume", *queues, "--max-messages", str(messages), "--inactivity-timeout", "20")
    assert worker.wait(timeout=60) == 0, worker.output


def reconcile_exit_code(manage) -> tuple[int, str]:
    process = manage("reconcile", "--minutes", "0")
    return process.wait(timeout=60), process.output


def test_another_body_under_a_letters_message_id_on_another_queue_is_marked_and_kept(
        client, admin_client, service, amqp, two_queues, manage):
    queue_a, queue_b = two_queues
    assert api_publish(client, service, routing_key=queue_a, message_id="order-4711",
                       body="ship 1 book")["status"] == "published"
    amqp.queue_purge(queue_a)  # the broker lost it
    code, output = reconcile_exit_code(manage)
    assert code == 1 and "order-4711" in output, output

    # Anyone may publish another body under that message_id, to another queue.
    amqp.basic_publish("", queue_b, FORGED, pika.BasicProperties(message_id="order-4711", delivery_mode=2))
    consume(manage, queue_a, queue_b, messages=1)

    letter = Message.objects.get(message_id="order-4711")
    assert bytes(letter.body) == b"ship 1 book" and letter.status == Message.Status.PUBLISHED
    forged = Delivery.objects.get(message=letter)
    assert forged.queue == queue_b and forged.status == Delivery.Status.ACKED
    assert forged.anomaly == Delivery.Anomaly.BODY_AND_ROUTE and not forged.body_matches and not forged.routed
    assert bytes(forged.body) == FORGED and forged.body_size == len(FORGED)
    assert forged.body_sha256 == hashlib.sha256(FORGED).hexdigest() != letter.body_sha256

    # The letter still counts as never delivered: reconcile still reports the loss.
    code, output = reconcile_exit_code(manage)
    assert code == 1 and "order-4711" in output and "MISMATCH" in output, output

    # The letter's page: a clear warning on that delivery, the forged body escaped.
    page = admin_client.get(reverse("message-detail", args=["order-4711"])).content.decode()
    assert f"Body differs from the letter's: {len(FORGED)} bytes, sha256 <code>{forged.body_sha256}</code>" in page
    assert "Not routed here by the letter's publish" in page and f"<code>{queue_b}</code>" in page
    assert "&lt;script&gt;alert(&#x27;forged&#x27;)&lt;/script&gt;" in page and "<script>alert" not in page

    # The admin: the "forged or mismatched" filter finds it, and its page shows the bytes delivered (escaped).
    deliveries = reverse("admin:messaging_delivery_changelist")
    for value in ("any", "body", "route"):
        listed = admin_client.get(deliveries, {"anomaly": value}).content.decode()
        assert queue_b in listed, value
    change = admin_client.get(reverse("admin:messaging_delivery_change", args=[forged.pk])).content.decode()
    assert "&lt;script&gt;alert(&#x27;forged&#x27;)" in change and "<script>alert" not in change
    assert "body differs and not routed here" in change

    # The API says so too.
    trail = client.get("/api/messages/order-4711/", HTTP_AUTHORIZATION=f"Bearer {service}").json()
    [delivery] = trail["deliveries"]
    assert delivery["body_matches"] is False and delivery["routed"] is False
    assert delivery["body_sha256"] == forged.body_sha256 and delivery["body_size"] == len(FORGED)


def test_a_redelivery_of_the_letter_itself_is_not_marked_and_reconciles(
        client, admin_client, service, amqp, two_queues, manage):
    queue_a, _ = two_queues
    message_id = api_publish(client, service, routing_key=queue_a, body="ship 2 books")["message_id"]
    # A consumer takes it and gives it back unacked: it comes again, redelivered.
    method = wait_for(lambda: amqp.basic_get(queue_a, auto_ack=False)[0], message="the letter in its queue")
    amqp.basic_nack(method.delivery_tag, requeue=True)
    consume(manage, queue_a, messages=1)

    delivery = Delivery.objects.get(message__message_id=message_id)
    assert delivery.redelivered and delivery.anomaly == Delivery.Anomaly.NONE and delivery.body is None
    assert delivery.body_sha256 == Message.objects.get(message_id=message_id).body_sha256
    assert not admin_client.get(reverse("admin:messaging_delivery_changelist"), {"anomaly": "any"}
                                ).context["cl"].result_count
    assert "Body differs" not in admin_client.get(reverse("message-detail", args=[message_id])).content.decode()
    code, output = reconcile_exit_code(manage)
    assert code == 0 and message_id not in output, output


def received(message_id, *, queue: str, exchange: str = "", routing_key: str | None = None, body: bytes = b"ok",
             headers: dict | None = None) -> Received:
    return Received(queue=queue, consumer_tag="ctag", delivery_tag=1, redelivered=False, exchange=exchange,
                    routing_key=queue if routing_key is None else routing_key, body=body,
                    properties=pika.BasicProperties(message_id=message_id, headers=headers))


def test_routed_copies_are_not_marked_and_a_misrouted_one_is():
    letter = Message(message_id="ours", exchange="orders", routing_key="eu.new", status=Message.Status.PUBLISHED)
    letter.set_body(b"ok")
    letter.save()
    death = {"x-death": [{"exchange": "orders", "routing-keys": ["eu.new"], "queue": "eu", "reason": "rejected"}]}
    batch = [
        received("ours", queue="eu", exchange="orders", routing_key="eu.new"),  # a bound queue
        received("ours", queue="audit", exchange="orders", routing_key="eu.new"),  # another bound queue
        received("ours", queue="eu.dead", exchange="dlx", routing_key="eu.new", headers=death),  # dead-lettered
        received("ours", queue="eu.dead", exchange="dlx", routing_key="eu.new", headers={"x-death": "forged"}),
        received("ours", queue="b", exchange="", routing_key="b"),  # published straight to another queue
    ]
    record_batch(batch, worker_id=None)
    assert list(Delivery.objects.order_by("pk").values_list("anomaly", flat=True)) == ["", "", "", "route", "route"]
    # Another producer's letter is known by its first delivery only: its route is not judged, its body is.
    record_batch([received("theirs", queue="x"), received("theirs", queue="y"),
                  received("theirs", queue="y", body=b"other")], worker_id=None)
    assert list(Delivery.objects.filter(message__message_id="theirs").order_by("pk").values_list(
        "anomaly", flat=True)) == ["", "", "body"]


COLLIDING = [(b"coll-\xff", b"coll-\xfe"), ("\x00" * 254 + "A", "\x00" * 254 + "B")]


def test_ids_stored_exactly_stay_as_they_are_and_others_stay_apart():
    for exact in ("order-4711", "café ☕", "x" * 255, "coll-\ufffd"):
        assert stored_message_id(exact) == (exact, None)
    for first, second in COLLIDING:
        (a, raw_a), (b, _) = stored_message_id(first), stored_message_id(second)
        assert a != b and len(a) <= 255 and len(b) <= 255 and "\x00" not in a + b
        raw = first if isinstance(first, bytes) else first.encode()
        assert raw_a == raw and a.endswith(ID_DIGEST_MARK + hashlib.sha256(raw).hexdigest())
    assert stored_message_id(b"coll-\xff")[0].startswith("coll-\ufffd~sha256:")


def test_colliding_raw_message_ids_are_two_letters_each(amqp, queue_name, manage, admin_client):
    amqp.queue_declare(queue=queue_name, durable=True)
    ids = [raw for pair in COLLIDING for raw in pair]
    for n, raw in enumerate(ids):
        amqp.basic_publish("", queue_name, b"body %d" % n, pika.BasicProperties(message_id=raw))
    consume(manage, queue_name, messages=len(ids))

    letters = {bytes(m.raw_message_id): m for m in Message.objects.all()}
    assert len(letters) == Message.objects.count() == 4
    for n, raw in enumerate(ids):
        letter = letters[raw if isinstance(raw, bytes) else raw.encode()]
        assert bytes(letter.body) == b"body %d" % n and letter.deliveries.get().anomaly == ""
        assert admin_client.get(reverse("message-detail", args=[letter.message_id])).status_code == 200
    assert {m.message_id[:6] for m in letters.values()} == {"coll-\ufffd", "\\u0000"}


def test_a_refused_delivery_is_compared_with_its_letter_too():
    letter = Message(message_id="ours-refused", routing_key="q", status=Message.Status.PUBLISHED)
    letter.set_body(b"ok")
    letter.save()
    s = record_refused(received("ours-refused", queue="q", body=b"not ok"), worker_id=None, reason="refused")
    delivery = Delivery.objects.get(pk=s.delivery_id)
    assert delivery.anomaly == Delivery.Anomaly.BODY and bytes(delivery.body) == b"not ok"
    assert (delivery.body_size, delivery.body_sha256) == (6, hashlib.sha256(b"not ok").hexdigest())
    s = record_refused(received(b"refused-\xff", queue="q"), worker_id=None, reason="refused")
    refused = Message.objects.get(pk=s.message_id)
    assert bytes(refused.raw_message_id) == b"refused-\xff" and refused.deliveries.get().anomaly == ""
