"""The Hello World round trip with real parts: form / command / plain pika → RabbitMQ → `consume` → database."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pika
import pytest
from django.contrib.auth.models import User

from messaging.models import Delivery, Message, Worker
from tests.conftest import ROOT, queue_depth, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_form_command_and_outside_producer_round_trip(publisher_client, amqp, queue_name, manage):
    # 1. The form (declares the queue).
    response = publisher_client.post("/publish/", {
        "mode": "queue", "queue": queue_name, "body": "Hello World!", "content_type": "text/plain",
        "headers": '{"x-test": "form"}', "persistent": "on", "declare": "on",
    })
    assert response.status_code == 302
    form_letter = Message.objects.get(routing_key=queue_name, origin=Message.Origin.FORM)
    assert response["Location"] == f"/messages/{form_letter.message_id}/"
    assert form_letter.status == Message.Status.PUBLISHED
    assert form_letter.published_by.username == "pat"

    # 2. manage.py publish: the same path.
    out = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "publish", queue_name, "Hello from the command"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    command_id, status = out.stdout.split()[:2]
    assert status == "published"

    # 3. Plain pika, as the tutorial's send.py: no message_id.
    for i in range(100):
        amqp.basic_publish(exchange="", routing_key=queue_name, body=f"outside {i}".encode())

    worker = manage("consume", queue_name, "--max-messages", "102", "--inactivity-timeout", "30")
    assert worker.wait(timeout=60) == 0, worker.output

    assert Message.objects.count() == 102
    assert Delivery.objects.filter(queue=queue_name).count() == 102
    assert set(Delivery.objects.values_list("status", flat=True)) == {Delivery.Status.ACKED}
    assert Delivery.objects.filter(message=form_letter).count() == 1  # matched, not duplicated
    assert Delivery.objects.filter(message__message_id=command_id).count() == 1
    outside = Message.objects.filter(origin=Message.Origin.EXTERNAL)
    assert outside.count() == 100
    assert set(outside.values_list("status", flat=True)) == {Message.Status.EXTERNAL}
    assert bytes(outside.get(body_sha256=__import__("hashlib").sha256(b"outside 7").hexdigest()).body) == b"outside 7"
    assert queue_depth(queue_name) == (0, 0)
    assert Worker.objects.get().status == Worker.Status.STOPPED
    assert "acked=102" in worker.output


def test_letter_page_shows_publish_and_ack(publisher_client, queue_name, manage):
    worker = manage("consume", queue_name, "--max-messages", "1", "--inactivity-timeout", "20")
    wait_for(lambda: _queue_has_consumer(queue_name), message="the worker to consume")
    publisher_client.post("/publish/", {
        "mode": "queue", "queue": queue_name, "body": "<script>alert(1)</script>", "content_type": "text/plain",
        "persistent": "on", "declare": "on",
    })
    letter = Message.objects.get(routing_key=queue_name)
    wait_for(lambda: Delivery.objects.filter(message=letter, status=Delivery.Status.ACKED).exists(), timeout=10,
             message="the delivery to be acked")
    page = publisher_client.get(f"/messages/{letter.message_id}/").content.decode()
    assert "published" in page and "acked" in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert worker.wait() == 0


def _queue_has_consumer(name: str) -> bool:
    try:
        return queue_depth(name)[1] > 0
    except pika.exceptions.ChannelClosedByBroker:
        return False


def test_existing_queue_with_other_arguments_is_used_as_is(amqp, manage, queue_name):
    amqp.queue_declare(queue=queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    amqp.basic_publish(exchange="", routing_key=queue_name, body=b"to a quorum queue",
                       properties=pika.BasicProperties(message_id=str(uuid.uuid4())))
    worker = manage("consume", queue_name, "--max-messages", "1", "--inactivity-timeout", "20")
    assert worker.wait() == 0, worker.output
    assert "type=quorum" in worker.output
    delivery = Delivery.objects.get(queue=queue_name)
    assert delivery.status == Delivery.Status.ACKED
    assert delivery.attempt == 1


def test_anonymous_and_unprivileged_cannot_publish(client, queue_name):
    data = {"mode": "queue", "queue": queue_name, "body": "x", "persistent": "on"}
    response = client.post("/publish/", data)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    User.objects.create_user("nobody", password="pw")
    client.login(username="nobody", password="pw")
    assert client.post("/publish/", data).status_code == 403
    assert not Message.objects.exists()


def test_broker_down_keeps_the_letter_pending(publisher_client, settings, fresh_publisher, queue_name):
    settings.RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens there
    response = publisher_client.post("/publish/", {
        "mode": "queue", "queue": queue_name, "body": "kept", "persistent": "on",
    }, follow=True)
    assert response.status_code == 200
    letter = Message.objects.get(routing_key=queue_name)
    assert letter.status == Message.Status.PENDING
    assert letter.last_error and "guest:guest" not in letter.last_error
    assert letter.next_attempt_at is not None
    assert "Not published yet" in response.content.decode()
