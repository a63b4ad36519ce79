"""Publishing outcomes recorded truthfully, with the real broker: published, unroutable, failed, pending."""
from __future__ import annotations

import base64
import subprocess
import threading
import time
import uuid

import pytest
from django.db import transaction

from messaging.amqp.publisher import IDLE_CHECK_SECONDS, publisher
from messaging.errors import InvalidMessage
from messaging.models import Message
from messaging.outbox.publishing import (
    create_message,
    publish_message,
    republish,
    retry_delay,
)
from messaging.outbox.routing import preview_route, topic_matches
from messaging.outbox.validation import decode_body
from tests.conftest import management_url, rabbitmq_url_with, rabbitmqctl_command

pytestmark = pytest.mark.django_db(transaction=True)

BINARY = bytes(range(256)) * 3 + b"\x00\xff\x00"


def send(**kwargs) -> Message:
    with transaction.atomic():
        letter = create_message(**kwargs)
    letter.refresh_from_db()
    return letter


def rabbitmqctl(*args: str) -> str:
    out = subprocess.run(rabbitmqctl_command(*args), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def test_published_unroutable_failed_then_next_publish_works(amqp, queue_name):
    published = send(routing_key=queue_name, body=b"one", declare=True)
    assert published.status == Message.Status.PUBLISHED and published.attempts == 1 and published.published_at

    unroutable = send(routing_key=f"{queue_name}-nobody", body=b"two")
    assert unroutable.status == Message.Status.UNROUTABLE
    assert "312 NO_ROUTE" in unroutable.last_error

    missing = send(exchange=f"no-such-{uuid.uuid4().hex}", routing_key="k", body=b"three")
    assert missing.status == Message.Status.FAILED
    assert "404" in missing.last_error and missing.next_attempt_at is None

    after = send(routing_key=queue_name, body=b"four")  # the channel closed by the 404 is replaced
    assert after.status == Message.Status.PUBLISHED
    bodies = [amqp.basic_get(queue_name, auto_ack=True)[2] for _ in range(2)]
    assert bodies == [b"one", b"four"]


def test_properties_over_a_frame_are_failed_and_the_connection_kept(amqp, queue_name):
    """Written past the checks (an older row), such a letter made the broker close the connection."""
    amqp.queue_declare(queue_name, durable=True)
    before = send(routing_key=queue_name, body=b"before")
    huge = Message.objects.create(routing_key=queue_name, body=b"x", headers={"h": "A" * 140_000})
    publish_message(huge)
    huge.refresh_from_db()
    assert huge.status == Message.Status.FAILED and "frame_max" in huge.last_error, huge.last_error
    connection = publisher()._connection
    after = send(routing_key=queue_name, body=b"after")
    assert (before.status, after.status) == (Message.Status.PUBLISHED, Message.Status.PUBLISHED)
    assert publisher()._connection is connection  # the same connection: the broker never saw it


def test_existing_amq_exchange_can_be_published_to_but_not_declared(queue_name):
    with pytest.raises(InvalidMessage, match="reserved"):
        send(exchange="amq.direct", exchange_type="direct", declare=True, routing_key=queue_name, body=b"x")
    letter = send(exchange="amq.direct", routing_key=f"{queue_name}-unbound", body=b"x")
    assert letter.status == Message.Status.UNROUTABLE  # amq.direct exists; nothing bound to this key


def test_binary_body_headers_and_properties_arrive_byte_for_byte(amqp, queue_name):
    letter = send(
        routing_key=queue_name, body=BINARY, declare=True, content_type="application/octet-stream",
        content_encoding="identity", correlation_id="corr-1", delivery_mode=1,
        headers={"n": 7, "f": 1.5, "yes": True, "tags": ["a", 2], "nested": {"k": "v"}, "é": "ü"},
        properties={"priority": 5, "reply_to": "replies", "expiration": "60000", "timestamp": 1700000000,
                    "type": "greeting", "user_id": "guest", "app_id": "mailroom-tests"},
    )
    assert letter.status == Message.Status.PUBLISHED, letter.last_error
    assert bytes(Message.objects.get(pk=letter.pk).body) == BINARY
    method, props, body = amqp.basic_get(queue_name, auto_ack=True)
    assert body == BINARY
    assert props.message_id == letter.message_id
    assert (props.content_type, props.content_encoding, props.correlation_id) == (
        "application/octet-stream", "identity", "corr-1")
    assert props.delivery_mode == 1 and props.priority == 5 and props.reply_to == "replies"
    assert props.expiration == "60000" and props.timestamp == 1700000000 and props.type == "greeting"
    assert props.user_id == "guest" and props.app_id == "mailroom-tests"
    assert props.headers["n"] == 7 and props.headers["yes"] is True and props.headers["f"] == 1.5
    assert props.headers["tags"] == ["a", 2] and props.headers["nested"] == {"k": "v"}
    assert props.headers["é"] == "ü"


def test_wrong_user_id_is_failed_and_the_channel_recovers(amqp, queue_name):
    bad = send(routing_key=queue_name, body=b"x", declare=True, properties={"user_id": "somebody-else"})
    assert bad.status == Message.Status.FAILED and "406" in bad.last_error
    assert send(routing_key=queue_name, body=b"y").status == Message.Status.PUBLISHED


@pytest.mark.parametrize("kwargs, message", [
    ({"routing_key": "é" * 128}, "routing key is longer than 255 bytes"),
    ({"routing_key": "q", "exchange": "x" * 256}, "exchange name is longer than 255 bytes"),
    ({"routing_key": "q", "headers": {"h" * 256: 1}}, "Header name"),
    ({"routing_key": "q", "headers": {"big": 2**70}}, "64 bits"),
    ({"routing_key": "q", "properties": {"priority": 300}}, "priority"),
    ({"routing_key": "q", "properties": {"expiration": "soon"}}, "expiration"),
    ({"routing_key": "q", "properties": {"colour": "blue"}}, "Unknown property"),
    ({"routing_key": "q", "delivery_mode": 3}, "delivery_mode"),
    ({"routing_key": ""}, "queue name"),
    ({"routing_key": "q", "headers": {"x": 1}, "message_id": "m\x00"}, "NUL"),
    ({"routing_key": "q", "properties": {"expiration": "1" * 256}}, "255 bytes"),
    ({"routing_key": "q", "delivery_mode": 2.0}, "delivery_mode"),
])
def test_invalid_letters_are_refused_before_anything_is_written(kwargs, message):
    with pytest.raises(InvalidMessage, match=message):
        send(body=b"x", **kwargs)
    assert not Message.objects.exists()


def test_body_over_the_limit_is_refused(settings):
    settings.MAILROOM_MAX_BODY_BYTES = 1000
    with pytest.raises(InvalidMessage, match="limit is 1000 bytes"):
        send(routing_key="q", body=b"x" * 1001)
    assert not Message.objects.exists()


def test_duplicate_message_id_is_refused(queue_name):
    send(routing_key=queue_name, body=b"x", declare=True, message_id="dup-1")
    with pytest.raises(InvalidMessage, match="already exists"):
        send(routing_key=queue_name, body=b"x", message_id="dup-1")


def test_a_message_id_taken_meanwhile_is_refused_and_the_transaction_goes_on(queue_name, monkeypatch):
    """Two requests with one message_id at once: both pass the existence check, one insert loses."""
    send(routing_key=queue_name, body=b"x", declare=True, message_id="race-1")
    monkeypatch.setattr("django.db.models.query.QuerySet.exists", lambda self: False)  # the other request's view
    with transaction.atomic():
        with pytest.raises(InvalidMessage, match="already exists"):
            create_message(routing_key=queue_name, body=b"y", message_id="race-1")
        create_message(routing_key=queue_name, body=b"z", message_id="race-2")  # the caller's transaction goes on
    assert sorted(Message.objects.values_list("message_id", "body")) == [("race-1", b"x"), ("race-2", b"z")]


def test_an_outcome_that_cannot_be_written_leaves_the_letter_pending(queue_name, monkeypatch, caplog):
    """The database gone between the commit and the outcome: the request still answers, the relay takes over."""
    from django.db import OperationalError

    def database_gone(*args, **kwargs):
        raise OperationalError("the database went away")

    monkeypatch.setattr("messaging.outbox.publishing.record_outcome", database_gone)
    with transaction.atomic():
        letter = create_message(routing_key=queue_name, body=b"x", declare=True)
    letter.refresh_from_db()
    assert letter.status == Message.Status.PENDING and letter.attempts == 0  # the relay publishes it again
    assert "the database went away" in caplog.text


def test_a_declared_exchange_deleted_since_is_declared_again(amqp, queue_name):
    exchange = f"{queue_name}-x"
    try:
        assert send(exchange=exchange, exchange_type="fanout", declare=True, routing_key="k",
                    body=b"x").status == Message.Status.UNROUTABLE  # declared; nothing bound
        amqp.exchange_delete(exchange=exchange)
        missing = send(exchange=exchange, routing_key="k", body=b"y")  # not declaring: 404, refused for good
        assert missing.status == Message.Status.FAILED and "404" in missing.last_error
        again = send(exchange=exchange, exchange_type="fanout", declare=True, routing_key="k", body=b"z")
        assert again.status == Message.Status.UNROUTABLE, again.last_error  # declared again, not a 404
    finally:
        amqp.exchange_delete(exchange=exchange)


def test_a_declared_exchange_deleted_since_is_declared_again_on_the_next_declaring_letter(amqp, queue_name):
    exchange = f"{queue_name}-x"
    amqp.queue_declare(queue_name, durable=True)
    amqp.exchange_declare(exchange=exchange, exchange_type="fanout")
    amqp.queue_bind(queue=queue_name, exchange=exchange)
    try:
        first = send(exchange=exchange, exchange_type="fanout", declare=True, routing_key="k", body=b"x")
        assert first.status == Message.Status.PUBLISHED  # declared (this publisher remembers it) and routed
        amqp.exchange_delete(exchange=exchange)  # and nothing else published in between
        again = send(exchange=exchange, exchange_type="fanout", declare=True, routing_key="k", body=b"y")
        assert again.status == Message.Status.UNROUTABLE, again.last_error  # declared again (no bindings): not a 404
    finally:
        amqp.exchange_delete(exchange=exchange)


def test_a_declared_queue_deleted_since_is_declared_again_not_unroutable(amqp, queue_name):
    assert send(routing_key=queue_name, body=b"x", declare=True).status == Message.Status.PUBLISHED
    amqp.queue_delete(queue=queue_name)
    again = send(routing_key=queue_name, body=b"y", declare=True)
    assert again.status == Message.Status.PUBLISHED, again.last_error
    assert amqp.queue_declare(queue_name, passive=True).method.message_count == 1  # published once
    amqp.queue_delete(queue=queue_name)
    undeclared = send(routing_key=queue_name, body=b"z")  # not asked to declare: returned, as it should be
    assert undeclared.status == Message.Status.UNROUTABLE


def test_a_declaration_the_broker_never_answers_is_given_up_after_the_timeout(
        settings, fresh_publisher, amqp, queue_name):
    """queue.declare of an existing queue waits for its process, here suspended: no answer, ever."""
    amqp.queue_declare(queue_name, durable=True)
    settings.MAILROOM_PUBLISH_TIMEOUT = 1.0
    queue_process = ('{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"%s">>)), '
                     'sys:%s(amqqueue:get_pid(Q)).')
    rabbitmqctl("eval", queue_process % (queue_name, "suspend"))
    outcome = {}

    def publish():
        started = time.monotonic()
        outcome["letter"] = send(routing_key=queue_name, body=b"stuck", declare=True)
        outcome["waited"] = time.monotonic() - started

    sender = threading.Thread(target=publish, daemon=True)
    try:
        sender.start()
        sender.join(timeout=10)  # without a deadline it would wait for ever
        finished = not sender.is_alive()
    finally:
        rabbitmqctl("eval", queue_process % (queue_name, "resume"))
    assert finished, "the declaration is still waiting for the broker after 10 s"
    stuck, waited = outcome["letter"], outcome["waited"]
    assert stuck.status == Message.Status.PENDING and stuck.last_error == "no answer from the broker within 1s"
    assert 1.0 <= waited < 2.5
    assert send(routing_key=queue_name, body=b"next", declare=True).status == Message.Status.PUBLISHED


def test_a_refused_login_leaves_the_letter_pending(settings, fresh_publisher, queue_name):
    """Wrong credentials are the deployment's fault, not the letter's: it waits for the relay."""
    settings.RABBITMQ_URL = rabbitmq_url_with(password="not-the-password")
    letter = send(routing_key=queue_name, body=b"x", declare=True)
    assert letter.status == Message.Status.PENDING and "refused the login" in letter.last_error
    assert "not-the-password" not in letter.last_error


def test_a_withheld_confirm_is_given_up_after_the_timeout(settings, fresh_publisher, amqp, queue_name):
    """pika's blocking publish waits for a confirm without a limit; the broker here keeps answering
    heartbeats while the queue's process, suspended, confirms nothing."""
    amqp.queue_declare(queue_name, durable=True)
    settings.MAILROOM_PUBLISH_TIMEOUT = 1.0
    queue_process = ('{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"%s">>)), '
                     'sys:%s(amqqueue:get_pid(Q)).')
    rabbitmqctl("eval", queue_process % (queue_name, "suspend"))
    try:
        started = time.monotonic()
        stuck = send(routing_key=queue_name, body=b"stuck")
        waited = time.monotonic() - started
    finally:
        rabbitmqctl("eval", queue_process % (queue_name, "resume"))
    assert stuck.status == Message.Status.PENDING and stuck.last_error == "no answer from the broker within 1s"
    assert 1.0 <= waited < 2.5
    assert send(routing_key=queue_name, body=b"next").status == Message.Status.PUBLISHED  # a new connection


def test_one_connection_reused_across_publishes(queue_name):
    send(routing_key=queue_name, body=b"x", declare=True)
    connection = publisher()._connection
    for _ in range(5):
        send(routing_key=queue_name, body=b"x")
    assert publisher()._connection is connection and connection.is_open


def test_publish_step_writes_one_update(queue_name):
    from django.db import connection

    send(routing_key=queue_name, body=b"warm", declare=True)
    with transaction.atomic():
        letter = Message.objects.create(routing_key=queue_name, body=b"x", status=Message.Status.PENDING)
    statements: list[str] = []
    if connection.vendor == "sqlite":  # the outcome is written on the driver's cursor: trace the driver
        connection.connection.set_trace_callback(statements.append)
    try:
        publish_message(letter)
    finally:
        if connection.vendor == "sqlite":
            connection.connection.set_trace_callback(None)
    letter.refresh_from_db()
    assert letter.status == Message.Status.PUBLISHED and letter.attempts == 1 and letter.published_at
    if connection.vendor == "sqlite":
        assert len(statements) == 1 and statements[0].startswith("UPDATE"), statements


def test_an_outcomes_relaxed_commit_never_reaches_the_callers_transaction(queue_name):
    """PostgreSQL: an outcome written on its own commits without waiting for the WAL flush, for that
    transaction only; written inside the caller's transaction, it leaves the caller's durability alone."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")

    def synchronous_commit() -> str:
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            return cursor.fetchone()[0]

    send(routing_key=queue_name, body=b"warm", declare=True)
    usual = synchronous_commit()
    alone = Message.objects.create(routing_key=queue_name, body=b"x", status=Message.Status.PENDING)
    for _ in range(6):  # past psycopg's prepare_threshold: the prepared statement behaves the same
        publish_message(alone)
    assert synchronous_commit() == usual
    assert connection.connection.info.transaction_status == 0  # IDLE: nothing left open
    with transaction.atomic():
        inside = Message.objects.create(routing_key=queue_name, body=b"y", status=Message.Status.PENDING)
        publish_message(inside)
        assert synchronous_commit() == usual
    for message in (alone, inside):
        message.refresh_from_db()
        assert message.status == Message.Status.PUBLISHED
    assert (alone.attempts, inside.attempts) == (6, 1)


def test_a_locked_letter_fails_its_outcome_cleanly_and_the_connection_goes_on(queue_name, amqp):
    """Another transaction holds the letter's row (an admin edit, a relay): the outcome cannot be
    written within lock_timeout. The error is Django's, no transaction is left open on the
    connection, and the letter stays pending for the relay. (No queue is bound: an `unroutable`
    outcome; every outcome is written before the step returns.)"""
    from django.db import OperationalError, connection, connections

    with transaction.atomic():
        letter = Message.objects.create(routing_key=queue_name, body=b"x", status=Message.Status.PENDING)
    postgresql = connection.vendor == "postgresql"
    other = connections.create_connection("default")
    other.set_autocommit(False)
    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout" if postgresql else "PRAGMA busy_timeout")
        usual = cursor.fetchone()[0]
    try:
        with other.cursor() as cursor:
            if postgresql:
                cursor.execute("SELECT id FROM messaging_message WHERE id = %s FOR UPDATE", [letter.pk])
            else:  # SQLite: a held write transaction
                cursor.execute("UPDATE messaging_message SET attempts = attempts WHERE id = %s", [letter.pk])
        with connection.cursor() as cursor:  # give up on the lock quickly
            cursor.execute("SET lock_timeout = '300ms'" if postgresql else "PRAGMA busy_timeout = 300")
        with pytest.raises(OperationalError):
            publish_message(letter)
    finally:
        other.rollback()
        other.close()
        with connection.cursor() as cursor:  # this connection serves the next tests
            cursor.execute(f"SET lock_timeout = '{usual}'" if postgresql else f"PRAGMA busy_timeout = {int(usual)}")
    assert not connection.in_atomic_block and connection.get_autocommit()
    letter.refresh_from_db()  # the same connection answers: nothing aborted is left open on it
    assert letter.status == Message.Status.PENDING and letter.attempts == 0
    if connection.vendor == "postgresql":
        assert connection.connection.info.transaction_status == 0  # IDLE


def test_republish_records_lineage_and_publisher(django_user_model, amqp, queue_name):
    user = django_user_model.objects.create_user("rita", password="pw-for-tests")
    original = send(routing_key=queue_name, body=BINARY, declare=True, headers={"a": 1}, properties={"type": "t"})
    with transaction.atomic():
        copy = republish(original, user=user)
    copy.refresh_from_db()
    assert copy.pk != original.pk and copy.message_id != original.message_id
    assert copy.republished_from == original and copy.published_by == user
    assert copy.origin == Message.Origin.REPUBLISH and copy.status == Message.Status.PUBLISHED
    assert bytes(copy.body) == BINARY and copy.headers == {"a": 1} and copy.properties == {"type": "t"}
    bodies = [amqp.basic_get(queue_name, auto_ack=True)[2] for _ in range(2)]
    assert bodies == [BINARY, BINARY]


def test_the_relays_backoff_holds_for_a_letter_pending_for_days():
    # ~1,000 attempts at the 300 s cap is 3 days; 2 ** 1024 would overflow a float and crash the relay.
    for attempts in (1, 2, 9, 10, 1025, 5000, 10**6):
        ceiling = min(300.0, 2.0 ** (attempts - 1)) if attempts < 64 else 300.0
        assert ceiling / 2 <= retry_delay(attempts).total_seconds() <= ceiling


def test_topic_matching():
    assert topic_matches("a.*.c", "a.b.c") and topic_matches("#", "") and topic_matches("a.#", "a")
    assert topic_matches("*.b.#", "x.b.y.z") and not topic_matches("a.*", "a") and not topic_matches("a.b", "a.c")


def test_topic_matching_agrees_with_the_definition_and_takes_no_exponential_path():
    import functools
    import itertools
    import random

    def reference(pattern: str, key: str) -> bool:  # the definition, memoized
        p, k = pattern.split(".") if pattern else [], key.split(".") if key else []

        @functools.cache
        def match(i: int, j: int) -> bool:
            if i == len(p):
                return j == len(k)
            if p[i] == "#":
                return any(match(i + 1, jj) for jj in range(j, len(k) + 1))
            return j < len(k) and p[i] in ("*", k[j]) and match(i + 1, j + 1)
        return match(0, 0)

    rng = random.Random(7)
    for _ in range(3000):
        pattern = ".".join(rng.choice(["a", "b", "*", "#"]) for _ in range(rng.randint(0, 6)))
        key = ".".join(rng.choice(["a", "b"]) for _ in range(rng.randint(0, 6)))
        assert topic_matches(pattern, key) == reference(pattern, key), (pattern, key)
    for pattern, key in itertools.product(["", "#", "*", "a..b", "#.#"], ["", "a", "a..b"]):
        assert topic_matches(pattern, key) == reference(pattern, key), (pattern, key)
    # A binding the backtracking match explored in exponential time (the preview pinned a web worker).
    assert not topic_matches(".".join(["#"] * 30 + ["z"]), ".".join(["a"] * 127))


def test_routing_preview_from_the_management_api(settings, amqp, queue_name):
    settings.RABBITMQ_MANAGEMENT_URL = management_url()
    exchange = f"t-preview-{uuid.uuid4().hex[:8]}"
    amqp.exchange_declare(exchange, exchange_type="topic", auto_delete=False)
    try:
        amqp.queue_declare(queue_name, durable=True)
        amqp.queue_bind(queue_name, exchange, routing_key="orders.*")
        reach = preview_route(exchange=exchange, routing_key="orders.new", headers={})
        assert reach.known and reach.queues == (queue_name,) and reach.text == f"reaches queues {queue_name}"
        none = preview_route(exchange=exchange, routing_key="invoices.new", headers={})
        assert none.queues == () and none.text == "no queue is bound: it would be returned"
        assert preview_route(exchange="", routing_key=queue_name, headers={}).queues == (queue_name,)
        assert "404" in preview_route(exchange=f"{exchange}-missing", routing_key="k", headers={}).text
    finally:
        amqp.exchange_delete(exchange)
    settings.RABBITMQ_MANAGEMENT_URL = ""
    assert not preview_route(exchange="", routing_key=queue_name, headers={}).known


@pytest.mark.node
def test_letter_over_the_broker_size_limit_is_failed(amqp, queue_name):
    rabbitmqctl("eval", "application:set_env(rabbit, max_message_size, 100000).")
    try:
        publisher().close()  # the limit is read when a channel opens
        big = send(routing_key=queue_name, body=b"x" * 200_000, declare=True)
        assert big.status == Message.Status.FAILED and "406" in big.last_error, big.last_error
        assert send(routing_key=queue_name, body=b"small").status == Message.Status.PUBLISHED
    finally:
        rabbitmqctl("eval", "application:set_env(rabbit, max_message_size, 134217728).")
        publisher().close()
    assert amqp.basic_get(queue_name, auto_ack=True)[2] == b"small"


def test_base64_body_decodes_exactly():

    assert decode_body(base64.b64encode(BINARY).decode(), encoding="base64") == BINARY
    with pytest.raises(InvalidMessage, match="base64"):
        decode_body("not base64!", encoding="base64")


def test_connection_closed_while_idle_is_replaced_before_publishing(queue_name):
    assert send(routing_key=queue_name, body=b"one", declare=True).status == Message.Status.PUBLISHED
    port = publisher()._connection._impl._transport._sock.getsockname()[1]
    rows = rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "name").splitlines()
    ours = [row.split("\t")[0] for row in rows if f":{port} ->" in row]
    assert len(ours) == 1, rows
    rabbitmqctl("close_connection", ours[0], "closed by a test while idle")  # only this test's connection
    time.sleep(IDLE_CHECK_SECONDS + 0.2)  # idle: the publisher checks the connection first
    assert publisher()._connection.is_open  # pika has not noticed yet: nothing serviced it
    after = send(routing_key=queue_name, body=b"two")
    assert after.status == Message.Status.PUBLISHED and after.attempts == 1, after.last_error
