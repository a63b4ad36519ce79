"""Request/reply (RabbitMQ tutorial 6) against a plain-pika RPC server: the command, the API, the form, the pages,
and replies linked to their requests by the consumer, also when they come after the wait."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pika
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging.amqp.subscription import Received
from messaging.consumer.recording import record_batch
from messaging.models import Delivery, Message
from messaging.outbox.requests import MAX_WAIT_SECONDS
from messaging.web.api import create_token
from tests.conftest import (
    ROOT,
    delete_queue,
    queue_depth,
    rabbitmq_url,
    rabbitmq_url_with,
    subprocess_env,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)  # a request is committed before it is published


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class RpcServer:
    """The tutorial's rpc_server.py in a thread: reads `queue`, answers fib(n) to reply_to with the correlation_id
    (a body that is not a number comes back quoted, to see that pages escape it)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.connection = self.channel = None

    def run(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
        self.channel = channel = self.connection.channel()
        channel.queue_declare(queue=self.queue)

        def on_request(ch, method, props, body):
            try:
                response = str(fib(int(body))).encode()
            except ValueError:
                response = b"not a number: " + body
            ch.basic_publish(exchange="", routing_key=props.reply_to,
                             properties=pika.BasicProperties(correlation_id=props.correlation_id), body=response)
            ch.basic_ack(delivery_tag=method.delivery_tag)

        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(queue=self.queue, on_message_callback=on_request)
        self.ready.set()
        channel.start_consuming()
        self.connection.close()

    def __enter__(self) -> RpcServer:
        self.thread.start()
        assert self.ready.wait(10), "the RPC server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)
        self.thread.join(10)


@pytest.fixture
def rpc_queue(request):
    name = f"rpc-{request.node.name[:30]}-{uuid.uuid4().hex[:6]}"
    yield name
    delete_queue(name)


@pytest.fixture
def api():
    """A client of its own for the API (the pages' client is logged in with a session)."""
    from django.test import Client

    return Client()


@pytest.fixture
def service():
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user(f"rpc-{uuid.uuid4().hex[:6]}", password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    return create_token(user=user, name="rpc")[1]


def api_post(api, key: str, payload) -> object:
    return api.post("/api/messages/", json.dumps(payload), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {key}")


def publish_command(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "manage.py"), "publish", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, timeout=60)
    return done, time.monotonic() - started


def test_the_command_prints_the_reply_and_records_it_linked_to_its_request(rpc_queue):
    with RpcServer(rpc_queue):
        done, _ = publish_command(rpc_queue, "30", "--wait-reply", "5")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"832040\n"
    request = Message.objects.get(routing_key=rpc_queue)
    assert request.origin == Message.Origin.COMMAND and request.status == Message.Status.PUBLISHED
    assert request.properties["reply_to"] == "amq.rabbitmq.reply-to" and request.correlation_id
    [reply] = request.replies.all()
    assert bytes(reply.body) == b"832040" and reply.in_reply_to == request
    assert reply.correlation_id == request.correlation_id and reply.origin == Message.Origin.EXTERNAL
    [delivery] = reply.deliveries.all()
    assert delivery.queue == "amq.rabbitmq.reply-to" and delivery.status == Delivery.Status.ACKED
    assert delivery.routing_key.startswith("amq.rabbitmq.reply-to.")


def test_without_a_server_the_command_exits_6_after_the_wait_and_keeps_the_request(rpc_queue, amqp):
    amqp.queue_declare(queue=rpc_queue)  # routed, but nobody answers
    done, elapsed = publish_command(rpc_queue, "30", "--wait-reply", "2")
    assert done.returncode == 6, done.stderr.decode()
    assert b"No reply within 2 s" in done.stderr and done.stdout == b""
    assert 2 <= elapsed < 15
    request = Message.objects.get(routing_key=rpc_queue)
    assert request.status == Message.Status.PUBLISHED and not request.replies.exists()
    assert Message.objects.count() == 1


def test_the_command_refuses_a_bad_wait(rpc_queue):
    for value in ["0", "-1", "3601", "nan", "soon"]:
        with pytest.raises(CommandError, match="wait.reply") as refused:
            call_command("publish", rpc_queue, "1", f"--wait-reply={value}")
        assert refused.value.returncode == 1, value
    assert not Message.objects.exists()


def test_the_api_answers_the_reply_and_the_pages_link_both_ways(api, service, publisher_client, rpc_queue):
    with RpcServer(rpc_queue):
        response = api_post(api, service, {"routing_key": rpc_queue, "body": "10", "wait_reply": 5})
        hostile = api_post(api, service, {"routing_key": rpc_queue, "body": "<script>x</script>", "wait_reply": 5})
    assert response.status_code == 201, response.content
    answer = response.json()
    assert answer["status"] == "published" and answer["reply_to"] == "amq.rabbitmq.reply-to"
    assert answer["reply"]["body"] == "55" and answer["reply"]["correlation_id"] == answer["correlation_id"]
    reply = Message.objects.get(message_id=answer["reply"]["message_id"])
    assert reply.in_reply_to.message_id == answer["message_id"]

    answer = hostile.json()
    assert answer["reply"]["body"] == "not a number: <script>x</script>"
    page = publisher_client.get(f"/messages/{answer['message_id']}/").content.decode()
    assert "not a number: &lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    assert f"/messages/{answer['reply']['message_id']}/" in page
    page = publisher_client.get(f"/messages/{answer['reply']['message_id']}/").content.decode()
    assert 'id="in-reply-to"' in page and f"/messages/{answer['message_id']}/" in page


def test_the_api_answers_a_null_reply_after_the_wait(api, service, amqp, rpc_queue):
    amqp.queue_declare(queue=rpc_queue)
    response = api_post(api, service, {"routing_key": rpc_queue, "body": "1", "wait_reply": 1})
    assert response.status_code == 201, response.content
    answer = response.json()
    assert answer["status"] == "published" and answer["reply"] is None
    assert answer["reply_note"].startswith("No reply within 1 s")
    assert Message.objects.filter(message_id=answer["message_id"]).exists()


def test_the_api_refuses_a_bad_wait_with_400_and_writes_nothing(api, service, rpc_queue):
    for value in [0, -1, MAX_WAIT_SECONDS + 1, "5", True, [5], {"s": 5}]:
        response = api_post(api, service, {"routing_key": rpc_queue, "body": "1", "wait_reply": value})
        assert response.status_code == 400, (value, response.content)
        assert "wait_reply" in response.json()["detail"]
    assert not Message.objects.exists()


def test_the_form_waits_and_shows_the_reply_under_the_request(publisher_client, rpc_queue):
    fields = {"mode": "queue", "queue": rpc_queue, "body": "12", "content_type": "text/plain",
              "body_encoding": "string", "persistent": "on", "wait_reply": "5"}
    with RpcServer(rpc_queue):
        response = publisher_client.post("/publish/", fields, follow=True)
    assert response.status_code == 200
    page = response.content.decode()
    request = Message.objects.get(routing_key=rpc_queue)
    assert request.origin == Message.Origin.FORM and request.replies.count() == 1
    assert 'id="replies"' in page and ">144</pre>" in page and "Published. Reply" in page

    bad = publisher_client.post("/publish/", {**fields, "wait_reply": "31"})
    assert bad.status_code == 200 and "less than or equal to 30" in bad.content.decode()
    assert Message.objects.count() == 2  # the request and its reply, nothing more


def test_a_reply_after_the_wait_is_linked_when_a_worker_records_it(api, service, rpc_queue, amqp, manage):
    replies = f"{rpc_queue}-replies"
    amqp.queue_declare(queue=replies)
    try:
        with RpcServer(rpc_queue):
            # No worker reads the reply queue yet: the wait ends without a reply, which waits in its queue.
            late = api_post(api, service, {"routing_key": rpc_queue, "body": "7", "wait_reply": 0.5,
                                           "properties": {"reply_to": replies}}).json()
            assert late["reply"] is None and late["reply_to"] == replies, late
            assert "links one when it comes" in late["reply_note"]
            wait_for(lambda: amqp.queue_declare(queue=replies, passive=True).method.message_count == 1,
                     timeout=10, message="the late reply in its queue")
            request = Message.objects.get(message_id=late["message_id"])
            assert not request.replies.exists()
            worker = manage("consume", replies)
            reply = wait_for(lambda: request.replies.first(), timeout=30, message="the late reply linked")
            assert bytes(reply.body) == b"13" and reply.deliveries.get().queue == replies

            # With the worker there, the wait sees the reply it records and links.
            response = api_post(api, service, {"routing_key": rpc_queue, "body": "20", "wait_reply": 10,
                                               "properties": {"reply_to": replies}})
            assert response.status_code == 201, response.content
            assert response.json()["reply"]["body"] == "6765"
        worker.signal()
        assert worker.wait(20) == 0, worker.output
    finally:
        delete_queue(replies)


def test_the_consumer_links_a_batch_of_replies_with_one_look_up(django_assert_max_num_queries):
    requests = [Message(routing_key="rpc", correlation_id=f"c-{i}", properties={"reply_to": "answers"},
                        status=Message.Status.PUBLISHED, origin=Message.Origin.API) for i in range(3)]
    for request in requests:
        request.set_body(b"q")
        request.save()
    batch = [Received(queue="answers", consumer_tag="t", delivery_tag=i + 1, redelivered=False, exchange="",
                      routing_key="answers", body=b"a",
                      properties=pika.BasicProperties(correlation_id=f"c-{i % 5}" if i % 2 else None))
             for i in range(40)]
    with CaptureQueriesContext(connection) as plain:
        record_batch([b for b in batch if b.properties.correlation_id is None], worker_id=None)
    with CaptureQueriesContext(connection) as linked:
        record_batch([b for b in batch if b.properties.correlation_id], worker_id=None)
    assert len(linked) <= len(plain) + 2  # the look-up of requests and one UPDATE, whatever the batch's size
    by_request = {r.pk: r.replies.count() for r in requests}
    assert sorted(by_request.values()) == [4, 4, 4]  # c-0, c-1, c-2 each answered 4 times; c-3 and c-4 are no one's
    assert Message.objects.filter(correlation_id__in=["c-3", "c-4"], in_reply_to__isnull=False).count() == 0


def test_a_request_the_broker_never_took_is_failed_not_left_to_the_relay(settings, rpc_queue):
    settings.RABBITMQ_URL = rabbitmq_url_with(password="not-the-password")  # the broker refuses the login
    with pytest.raises(CommandError) as refused:
        call_command("publish", rpc_queue, "1", "--wait-reply=1")
    assert refused.value.returncode == 4
    request = Message.objects.get()
    assert request.status == Message.Status.FAILED and "not retried" in request.last_error
    assert request.next_attempt_at is None and "not-the-password" not in request.last_error


def test_a_direct_reply_to_request_left_pending_is_failed_by_the_relay_which_goes_on(manage, amqp, rpc_queue):
    """A crash between the request's commit and its publish leaves it pending: the broker refuses it on the
    relay's channel (no reply consumer there), and the relay records that and publishes the rest."""
    amqp.queue_declare(queue=rpc_queue)
    due = timezone.now() - timedelta(seconds=1)
    for n, reply_to in enumerate(["amq.rabbitmq.reply-to", "", ""]):
        letter = Message(routing_key=rpc_queue, properties={"reply_to": reply_to} if reply_to else {},
                         next_attempt_at=due, message_id=f"{rpc_queue}-{n}", origin=Message.Origin.API)
        letter.set_body(b"1")
        letter.save()
    relay = manage("relay", "--once")
    assert relay.wait(60) == 0, relay.output
    outcomes = dict(Message.objects.values_list("message_id", "status"))
    assert outcomes == {f"{rpc_queue}-0": "failed", f"{rpc_queue}-1": "published", f"{rpc_queue}-2": "published"}
    assert "reply consumer" in Message.objects.get(message_id=f"{rpc_queue}-0").last_error
    assert queue_depth(rpc_queue) == (2, 0)
