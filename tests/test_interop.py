"""Clients Mailroom did not write: aio-pika and kombu publish to it, plain pika consumes from it."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid

import aio_pika
import kombu
import pika
import pytest
from django.conf import settings

from messaging.models import Delivery, Message

pytestmark = pytest.mark.django_db(transaction=True)

WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def broker_address() -> pika.URLParameters:
    """Host, port, credentials and vhost of the first broker in RABBITMQ_URL, for the other clients."""
    return pika.URLParameters(settings.RABBITMQ_URL.split(",")[0])


async def publish_with_aio_pika(queue: str) -> None:
    address = broker_address()
    connection = await aio_pika.connect(
        host=address.host, port=address.port, login=address.credentials.username,
        password=address.credentials.password, virtualhost=address.virtual_host,
    )
    async with connection:
        channel = await connection.channel()  # publisher confirms on
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=b"\x00\x01 from aio-pika \xff",
                headers={"x-client": "aio-pika", "count": 3, "flag": True, "tags": ["a", "b"],
                         "nested": {"k": "v", "n": 2}, "raw": bytearray(b"bytes")},
                content_type="application/octet-stream", content_encoding="binary",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, priority=5,
                correlation_id="corr-aio", reply_to="replies-aio", expiration=3600,
                message_id="aio-" + queue, timestamp=WHEN, type="greeting", user_id=address.credentials.username,
                app_id="aio-pika-test",
            ),
            routing_key=queue,
        )


def kombu_connection() -> kombu.Connection:
    address = broker_address()
    return kombu.Connection(
        hostname=address.host, port=address.port, userid=address.credentials.username,
        password=address.credentials.password, virtual_host=address.virtual_host, transport="pyamqp",
    )


def publish_with_kombu(queue: str) -> None:
    with kombu_connection() as connection:
        producer = connection.Producer()
        producer.publish(
            json.dumps({"hello": "kombu", "ok": True}).encode(), exchange="", routing_key=queue,
            content_type="application/json", content_encoding="utf-8", serializer=None,
            headers={"x-client": "kombu", "retries": 0}, delivery_mode=2, priority=1,
            message_id="kombu-" + queue, correlation_id="corr-kombu", reply_to="replies-kombu",
            app_id="kombu-test", type="greeting",
        )


def test_letters_from_aio_pika_and_kombu_are_recorded_intact(amqp, queue_name, manage):
    amqp.queue_declare(queue=queue_name, durable=True)  # as `consume --durable` declares it
    asyncio.run(publish_with_aio_pika(queue_name))
    publish_with_kombu(queue_name)

    worker = manage("consume", queue_name, "--max-messages", "2", "--inactivity-timeout", "20")
    assert worker.wait(timeout=60) == 0, worker.output

    aio = Message.objects.get(message_id="aio-" + queue_name)
    assert bytes(aio.body) == b"\x00\x01 from aio-pika \xff"
    assert aio.origin == Message.Origin.EXTERNAL
    assert (aio.content_type, aio.content_encoding, aio.correlation_id, aio.delivery_mode) == (
        "application/octet-stream", "binary", "corr-aio", 2,
    )
    assert aio.headers == {"x-client": "aio-pika", "count": 3, "flag": True, "tags": ["a", "b"],
                           "nested": {"k": "v", "n": 2}, "raw": {"$bytes": "Ynl0ZXM="}}
    assert aio.properties["priority"] == 5
    assert aio.properties["reply_to"] == "replies-aio"
    assert aio.properties["expiration"] == "3600000"  # aio-pika sends seconds as milliseconds
    assert aio.properties["type"] == "greeting"
    assert aio.properties["app_id"] == "aio-pika-test"
    assert aio.properties["user_id"] == broker_address().credentials.username
    assert aio.properties["timestamp"] == int(WHEN.timestamp())  # AMQP timestamps are POSIX seconds

    kom = Message.objects.get(message_id="kombu-" + queue_name)
    assert json.loads(bytes(kom.body)) == {"hello": "kombu", "ok": True}
    assert (kom.content_type, kom.content_encoding, kom.correlation_id, kom.delivery_mode) == (
        "application/json", "utf-8", "corr-kombu", 2,
    )
    assert kom.headers == {"x-client": "kombu", "retries": 0}
    assert kom.properties["priority"] == 1
    assert kom.properties["reply_to"] == "replies-kombu"
    assert kom.properties["app_id"] == "kombu-test"
    assert kom.properties["type"] == "greeting"

    deliveries = Delivery.objects.filter(queue=queue_name)
    assert deliveries.count() == 2
    assert set(deliveries.values_list("status", flat=True)) == {Delivery.Status.ACKED}


FORM_BODY = '{"greeting": "héllo ✓", "n": 1}'
FORM_HEADERS = {"x-trace": "form-interop", "n": 7, "ok": True, "nested": {"a": [1, "b"]}}


def post_letter(client, **fields) -> Message:
    response = client.post("/publish/", {
        "body": FORM_BODY, "content_type": "application/json", "headers": json.dumps(FORM_HEADERS),
        "persistent": "on", "declare": "on", **fields,
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    letter = Message.objects.get(message_id=response["Location"].rstrip("/").rsplit("/", 1)[1])
    assert letter.status == Message.Status.PUBLISHED, letter.last_error
    return letter


def assert_received_intact(channel, queue: str, letter: Message) -> None:
    method, properties, body = channel.basic_get(queue=queue, auto_ack=False)
    assert method is not None, f"nothing arrived in {queue}"
    channel.basic_ack(method.delivery_tag)
    assert body == FORM_BODY.encode("utf-8")
    assert properties.message_id == letter.message_id
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.headers == FORM_HEADERS
    assert channel.basic_get(queue=queue, auto_ack=True)[0] is None  # exactly one copy


def test_form_letter_reaches_a_plain_pika_consumer_intact(publisher_client, amqp, queue_name):
    letter = post_letter(publisher_client, mode="queue", queue=queue_name)
    assert_received_intact(amqp, queue_name, letter)


def test_form_letter_reaches_a_fanout_subscriber_through_its_server_named_queue(publisher_client, amqp):
    exchange = f"t-interop-fanout-{uuid.uuid4().hex[:8]}"
    amqp.exchange_declare(exchange=exchange, exchange_type="fanout", durable=True)  # as the form does with MAILROOM_DURABLE
    try:
        own = amqp.queue_declare(queue="", exclusive=True).method.queue
        assert own.startswith("amq.gen-")
        amqp.queue_bind(queue=own, exchange=exchange)
        letter = post_letter(publisher_client, mode="exchange", exchange=exchange, exchange_type="fanout")
        assert_received_intact(amqp, own, letter)
    finally:
        amqp.exchange_delete(exchange=exchange)


def test_float_headers_from_another_client_are_kept(amqp, queue_name, manage):
    """pika 1.4 decodes AMQP doubles as ints (see broker._decode_value); kombu sends Python floats as doubles."""
    amqp.queue_declare(queue=queue_name, durable=True)
    with kombu_connection() as connection:
        producer = connection.Producer()
        producer.publish(b"floats", exchange="", routing_key=queue_name, serializer=None, message_id="floats-" + queue_name,
                         headers={"ratio": 1.5, "negative": -0.125, "nested": {"x": [2.25, 7]}})
        producer.publish(b"after", exchange="", routing_key=queue_name, serializer=None, message_id="after-" + queue_name)

    worker = manage("consume", queue_name, "--max-messages", "2", "--inactivity-timeout", "20")
    assert worker.wait(timeout=60) == 0, worker.output
    floats = Message.objects.get(message_id="floats-" + queue_name)
    assert floats.headers == {"ratio": 1.5, "negative": -0.125, "nested": {"x": [2.25, 7]}}
    assert Message.objects.filter(message_id="after-" + queue_name).exists()
