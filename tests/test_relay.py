"""The outbox relay with the real broker: crashes after commit, concurrent relays, a stopped broker, a disk alarm."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from datetime import timedelta

import pika
import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.db import connection, transaction
from django.utils import timezone

from messaging import statements
from messaging.errors import FatalBrokerError
from messaging.models import Delivery, Message
from messaging.web.api import create_token
from tests.conftest import (
    ROOT,
    management_request,
    management_url,
    queue_depth,
    rabbitmq_url_with,
    rabbitmqctl,
    subprocess_env,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)

def broker_answers() -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(settings.RABBITMQ_URL.split(",")[0])).close()
        return True
    except pika.exceptions.AMQPError:
        return False


@pytest.fixture
def short_timeout(settings, fresh_publisher):
    """A fresh publisher for this thread with a 2 s broker timeout (it reads the setting when created)."""
    settings.MAILROOM_PUBLISH_TIMEOUT = 2.0


@pytest.fixture
def publisher_user():
    user = User.objects.create_user("paula", password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    return user


def pending_letters(queue: str, count: int) -> None:
    now = timezone.now()
    letters = []
    for i in range(count):
        letter = Message(routing_key=queue, status=Message.Status.PENDING, next_attempt_at=now, origin=Message.Origin.API)
        letter.set_body(f"letter {i}".encode())
        letters.append(letter)
    Message.objects.bulk_create(letters)


def test_crash_between_commit_and_publish_is_relayed_once(manage, queue_name):
    message_id = f"crash-{uuid.uuid4().hex}"
    # The process dies in its first on_commit callback: the row is committed, the publish never happens.
    code = (
        "import os\n"
        "from django.db import transaction\n"
        "from messaging.outbox.publishing import create_message\n"
        "with transaction.atomic():\n"
        "    transaction.on_commit(lambda: os._exit(0))\n"
        f"    create_message(routing_key={queue_name!r}, body=b'crash', declare=True, message_id={message_id!r})\n"
    )
    out = subprocess.run([sys.executable, str(ROOT / "manage.py"), "shell", "-c", code], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    letter = Message.objects.get(message_id=message_id)
    assert letter.status == Message.Status.PENDING and letter.attempts == 0
    assert letter.next_attempt_at > timezone.now()  # left to the (dead) request for the grace period

    early = manage("relay", "--once")
    assert early.wait() == 0, early.output
    assert Message.objects.get(message_id=message_id).status == Message.Status.PENDING  # not due yet

    Message.objects.filter(message_id=message_id).update(next_attempt_at=timezone.now())  # the grace has passed
    for _ in range(2):  # a second pass finds nothing to do
        relay = manage("relay", "--once")
        assert relay.wait() == 0, relay.output
    letter.refresh_from_db()
    assert letter.status == Message.Status.PUBLISHED and letter.attempts == 1
    assert queue_depth(queue_name) == (1, 0)


def test_concurrent_relays_publish_each_letter_once(manage, amqp, queue_name):
    amqp.queue_declare(queue_name, durable=True)
    pending_letters(queue_name, 3000)
    relays = [manage("relay", "--once", "--batch-size", "100") for _ in range(3)]
    for relay in relays:
        assert relay.wait(timeout=90) == 0, relay.output
    assert Message.objects.filter(status=Message.Status.PUBLISHED).count() == 3000
    assert set(Message.objects.values_list("attempts", flat=True)) == {1}
    assert queue_depth(queue_name) == (3000, 0)
    assert sum("published=" in r.output for r in relays) >= 2  # the work was shared


def test_relay_records_unroutable_and_failed_in_a_batch(amqp, queue_name):
    from messaging.outbox.relay import Relay, RelayOptions

    amqp.queue_declare(queue_name, durable=True)
    pending_letters(queue_name, 5)
    now = timezone.now()
    nobody = Message.objects.create(routing_key=f"{queue_name}-nobody", body=b"x", next_attempt_at=now)
    missing = Message.objects.create(exchange=f"missing-{uuid.uuid4().hex}", routing_key="k", body=b"x", next_attempt_at=now)
    relay = Relay(RelayOptions(once=True))
    relay.run()
    nobody.refresh_from_db()
    missing.refresh_from_db()
    assert nobody.status == Message.Status.UNROUTABLE and "312 NO_ROUTE" in nobody.last_error
    assert missing.status == Message.Status.FAILED and "404" in missing.last_error
    assert Message.objects.filter(status=Message.Status.PUBLISHED).count() == 5
    assert queue_depth(queue_name) == (5, 0)


def test_outcomes_of_a_group_over_the_parameter_limit_are_written_in_parts(amqp, queue_name, monkeypatch):
    from messaging.outbox.relay import Relay, RelayOptions

    monkeypatch.setattr(statements, "MAX_PARAMETERS", 3)  # SQLite, 7 messages: UPDATEs for 3, 3 and 1
    amqp.queue_declare(queue_name, durable=True)
    pending_letters(queue_name, 7)
    other = Message.objects.create(routing_key=queue_name, body=b"x", next_attempt_at=timezone.now() + timedelta(hours=1))
    limit = None
    if connection.vendor == "sqlite":  # a limit as small as the patched one: one UPDATE for all 7 would fail
        import sqlite3

        connection.ensure_connection()
        limit = connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 10)
    try:
        Relay(RelayOptions(once=True)).run()
    finally:
        if limit is not None:
            connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
    assert Message.objects.filter(status=Message.Status.PUBLISHED, attempts=1).count() == 7
    other.refresh_from_db()
    assert (other.status, other.attempts) == (Message.Status.PENDING, 0)  # not due: its pk is nowhere in the IN lists
    assert queue_depth(queue_name) == (7, 0)


def test_a_declared_queue_deleted_under_the_relay_is_declared_again(amqp, queue_name):
    from messaging.outbox.relay import Relay, RelayOptions

    relay = Relay(RelayOptions())
    try:
        pending_letters(queue_name, 3)
        Message.objects.update(declare=True)
        relay.relay_due()  # declares the queue (the relay remembers it) and publishes
        amqp.queue_delete(queue=queue_name)
        pending_letters(queue_name, 3)
        Message.objects.filter(status=Message.Status.PENDING).update(declare=True)
        relay.relay_due()
    finally:
        relay.close()
    assert set(Message.objects.values_list("status", flat=True)) == {Message.Status.PUBLISHED}
    assert queue_depth(queue_name) == (3, 0)  # the second three, once each, in the queue declared again


def test_a_declared_exchange_deleted_under_the_relay_is_declared_again_before_the_batch(amqp, queue_name):
    """Found only by the pipelined publish, the 404 would close the channel, and every unconfirmed
    letter of the window would be published again one by one (twice, for those already queued)."""
    from messaging.outbox.relay import Relay, RelayOptions

    exchange = f"{queue_name}-x"
    amqp.queue_declare(queue_name, durable=True)
    now = timezone.now()
    relay = Relay(RelayOptions())
    try:
        Message.objects.create(exchange=exchange, exchange_type="fanout", declare=True, routing_key="k", body=b"x",
                               next_attempt_at=now)
        relay.relay_due()  # declares the exchange (the relay's publisher remembers it)
        amqp.exchange_delete(exchange=exchange)
        pending_letters(queue_name, 50)  # due first, then three letters to the deleted exchange
        Message.objects.filter(routing_key=queue_name).update(next_attempt_at=now - timedelta(seconds=5))
        for _ in range(3):
            Message.objects.create(exchange=exchange, exchange_type="fanout", declare=True, routing_key="k",
                                   body=b"y", next_attempt_at=now)
        relay.relay_due()
    finally:
        relay.close()
        amqp.exchange_delete(exchange=exchange)
    assert set(Message.objects.filter(exchange=exchange).values_list("status", flat=True)) == {
        Message.Status.UNROUTABLE}  # declared again (nothing bound): not failed with a 404
    assert set(Message.objects.filter(routing_key=queue_name).values_list("status", "attempts")) == {
        (Message.Status.PUBLISHED, 1)}
    assert queue_depth(queue_name) == (50, 0)  # each once


def management(method: str, path: str):
    with urllib.request.urlopen(management_request(path, method=method), timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


def test_the_relays_connection_dropped_while_idle_is_noticed_before_publishing(amqp, queue_name):
    from messaging.outbox.relay import Relay, RelayOptions

    amqp.queue_declare(queue_name, durable=True)
    relay = Relay(RelayOptions())
    try:
        pending_letters(queue_name, 2)
        relay.relay_due()
        # The broker drops the idle relay's connection (as it does when heartbeats stop: the relay's
        # I/O loop runs only while it publishes).
        name = "mailroom-relay"
        wait_for(lambda: any(c.get("client_properties", {}).get("connection_name") == name
                             for c in management("GET", "connections")), timeout=10, message="the relay's connection listed")
        for c in management("GET", "connections"):
            if c.get("client_properties", {}).get("connection_name") == name:
                management("DELETE", "connections/" + urllib.parse.quote(c["name"], safe=""))
        time.sleep(0.5)
        pending_letters(queue_name, 2)
        relay.relay_due()
    finally:
        relay.close()
    rows = list(Message.objects.values_list("status", "attempts"))
    assert rows == [(Message.Status.PUBLISHED, 1)] * 4, rows  # published at once, no failed attempt
    assert queue_depth(queue_name) == (4, 0)


def test_a_letter_pika_cannot_encode_is_failed_and_the_relay_goes_on(amqp, queue_name):
    """A row written past the checks (an older version, a hand-made INSERT) must not stop the relay."""
    from messaging.outbox.relay import Relay, RelayOptions

    amqp.queue_declare(queue_name, durable=True)
    now = timezone.now()
    long_property = Message.objects.create(routing_key=queue_name, body=b"x", next_attempt_at=now,
                                           properties={"expiration": "1" * 300})
    long_header = Message.objects.create(routing_key=queue_name, body=b"x", next_attempt_at=now,
                                         headers={"h" * 300: 1})
    pending_letters(queue_name, 3)
    assert Relay(RelayOptions(once=True)).run() == 0
    for refused in (long_property, long_header):
        refused.refresh_from_db()
        assert refused.status == Message.Status.FAILED and "ShortStringTooLong" in refused.last_error
    assert Message.objects.filter(status=Message.Status.PUBLISHED).count() == 3
    assert queue_depth(queue_name) == (3, 0)


def test_a_letter_whose_properties_overflow_a_frame_is_failed_and_the_rest_published(amqp, queue_name):
    """The broker closes the whole connection (501 frame_too_large) for such a frame: every letter in
    flight went with it, and the relay sent the same letter again at each retry."""
    from messaging.outbox.relay import Relay, RelayOptions

    amqp.queue_declare(queue_name, durable=True)
    pending_letters(queue_name, 2)
    huge = Message.objects.create(routing_key=queue_name, body=b"x", next_attempt_at=timezone.now(),
                                  headers={"h": "A" * 140_000})  # written past the form's and API's checks
    pending_letters(queue_name, 2)
    assert Relay(RelayOptions(once=True)).run() == 0
    huge.refresh_from_db()
    assert huge.status == Message.Status.FAILED and "frame_max" in huge.last_error, huge.last_error
    assert Message.objects.filter(status=Message.Status.PUBLISHED).count() == 4
    assert queue_depth(queue_name) == (4, 0)


def test_relay_stops_gracefully_on_sigterm(manage, amqp, queue_name):
    amqp.queue_declare(queue_name, durable=True)
    relay = manage("relay", "--idle", "0.2")
    pending_letters(queue_name, 50)
    wait_for(lambda: not Message.objects.pending().exists(), timeout=30, message="the relay to publish")
    relay.signal(signal.SIGTERM)
    assert relay.wait(timeout=10) == 0, relay.output
    assert "relay stopped" in relay.output and "published=50" in relay.output


@pytest.mark.node
@pytest.mark.slow
def test_broker_stopped_nothing_published_is_lost(client, publisher_user, short_timeout, manage, queue_name):
    client.force_login(publisher_user)
    _, key = create_token(user=publisher_user, name="tests")
    rabbitmqctl("stop_app")
    try:
        wait_for(lambda: not broker_answers(), timeout=30, message="the broker to stop")
        for i in range(10):
            started = time.monotonic()
            response = client.post("/publish/", {"mode": "queue", "queue": queue_name, "body": f"form {i}",
                                                 "declare": "on", "persistent": "on"})
            assert response.status_code == 302
            assert time.monotonic() - started < 10
        for i in range(10):
            started = time.monotonic()
            response = client.post("/api/messages/", json.dumps({"routing_key": queue_name, "body": f"api {i}",
                                                                 "declare": True}),
                                   content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}")
            assert response.status_code == 202, response.content
            assert response.json()["status"] == "pending"
            assert time.monotonic() - started < 10
        letters = Message.objects.filter(routing_key=queue_name)
        assert letters.count() == 20
        assert set(letters.values_list("status", flat=True)) == {Message.Status.PENDING}
        assert all(letter.last_error and letter.attempts == 1 for letter in letters)
    finally:
        rabbitmqctl("start_app")
    wait_for(broker_answers, timeout=60, message="the broker to start")
    relay = manage("relay", "--idle", "0.2")
    worker = manage("consume", queue_name, "--max-messages", "20", "--inactivity-timeout", "30")
    assert worker.wait(timeout=90) == 0, worker.output + relay.output
    assert set(Message.objects.filter(routing_key=queue_name).values_list("status", flat=True)) == {"published"}
    deliveries = Delivery.objects.filter(queue=queue_name)
    assert deliveries.count() == 20 and deliveries.values("message").distinct().count() == 20
    assert set(deliveries.values_list("status", flat=True)) == {Delivery.Status.ACKED}
    relay.signal(signal.SIGTERM)
    assert relay.wait(timeout=15) == 0, relay.output


@pytest.mark.node
@pytest.mark.slow
def test_disk_alarm_blocks_then_relay_publishes(client, publisher_user, short_timeout, settings, manage, amqp,
                                                queue_name):
    from messaging.amqp import management
    from messaging.web.cluster import NODES_CACHE_SECONDS

    def banner_shown() -> bool:
        return "blocking publishers" in client.get("/messages/").content.decode()

    amqp.queue_declare(queue_name, durable=True)
    client.force_login(publisher_user)
    settings.RABBITMQ_MANAGEMENT_URL = management_url()
    rabbitmqctl("set_disk_free_limit", "1000000GB")
    try:
        wait_for(lambda: management.alarms(), timeout=30, message="the disk alarm")
        started = time.monotonic()
        response = client.post("/publish/", {"mode": "queue", "queue": queue_name, "body": "blocked",
                                             "persistent": "on"})
        assert response.status_code == 302
        assert time.monotonic() - started < 8  # blocked_connection_timeout, not forever
        letter = Message.objects.get(routing_key=queue_name)
        assert letter.status == Message.Status.PENDING
        assert letter.last_error.startswith("broker blocked"), letter.last_error
        # Pages show the alarms the management API gave within NODES_CACHE_SECONDS: the banner
        # follows the broker within that time, not at once (an answer from before may be cached).
        wait_for(banner_shown, timeout=NODES_CACHE_SECONDS + 10, interval=0.5, message="the alarm banner")
        relay = manage("relay", "--idle", "0.2", env=subprocess_env(MAILROOM_PUBLISH_TIMEOUT="2"))
        time.sleep(1)
    finally:
        rabbitmqctl("set_disk_free_limit", "50MB")
    wait_for(lambda: not management.alarms(), timeout=30, message="the alarm to clear")
    Message.objects.filter(pk=letter.pk).update(next_attempt_at=timezone.now())  # skip the backoff
    wait_for(lambda: Message.objects.get(pk=letter.pk).status == Message.Status.PUBLISHED, timeout=30,
             message="the relay to publish after the alarm")
    assert amqp.basic_get(queue_name, auto_ack=True)[2] == b"blocked"
    wait_for(lambda: not banner_shown(), timeout=NODES_CACHE_SECONDS + 10, interval=0.5,
             message="the alarm banner to go once the alarm has cleared")
    relay.signal(signal.SIGTERM)
    assert relay.wait(timeout=20) == 0, relay.output


@pytest.mark.parametrize("wrong, said, exchange", [
    pytest.param({"password": "not-the-password"}, "refused the login", "", id="password"),
    pytest.param({"vhost": "no-such-vhost"}, "ProbableAccessDeniedError", "", id="vhost"),
    pytest.param({"password": "not-the-password"}, "refused the login", "mailroom-relay-login",
                 id="password-declaring"),  # declared first
])
def test_wrong_credentials_or_vhost_stop_the_relay_with_exit_1_and_the_letters_stay_pending(manage, queue_name,
                                                                                            wrong, said, exchange):
    pending_letters(queue_name, 3)
    if exchange:
        Message.objects.filter(routing_key=queue_name).update(exchange=exchange, exchange_type="direct", declare=True)
    relay = manage("relay", "--idle", "0.2", env=subprocess_env(RABBITMQ_URL=rabbitmq_url_with(**wrong)))
    assert relay.wait(timeout=30) == 1, relay.output
    assert "cannot publish" in relay.output and said in relay.output
    assert "not-the-password" not in relay.output
    statuses = list(Message.objects.filter(routing_key=queue_name).values_list("status", flat=True))
    assert statuses == [Message.Status.PENDING] * 3
    # and due at once, for a relay started with the right settings (SQLite's claim lease is lifted)
    assert Message.objects.filter(routing_key=queue_name, next_attempt_at__lte=timezone.now()).count() == 3


def test_a_login_refused_for_the_next_batch_still_records_what_the_broker_confirmed(amqp, queue_name, monkeypatch):
    """The next batch goes out while the one before is still to be recorded: a refusal then must not
    leave the confirmed letters pending (the relay would publish them again)."""
    from messaging.outbox.relay import Relay, RelayOptions

    amqp.queue_declare(queue_name, durable=True)
    pending_letters(queue_name, 6)
    relay = Relay(RelayOptions(batch_size=3, window=3))
    sent, calls = relay.pipeline.send, []

    def send(letters):
        calls.append(len(letters))
        if len(calls) == 2:  # the second batch: the login is refused
            raise FatalBrokerError("the broker refused the login (injected)")
        return sent(letters)

    monkeypatch.setattr(relay.pipeline, "send", send)
    assert relay.run() == 1
    statuses = sorted(Message.objects.filter(routing_key=queue_name).values_list("status", flat=True))
    assert statuses == [Message.Status.PENDING] * 3 + [Message.Status.PUBLISHED] * 3
    pending = Message.objects.filter(routing_key=queue_name, status=Message.Status.PENDING)
    assert [m.next_attempt_at <= timezone.now() and m.attempts == 0 for m in pending] == [True] * 3  # not sent: due at once
    wait_for(lambda: queue_depth(queue_name)[0] == 3, message="the three confirmed letters in the queue")


def test_a_claimed_batch_is_kept_from_other_relays_and_released_by_a_crash(amqp, queue_name):
    """PostgreSQL holds the batch's row locks until its outcomes commit; a relay that dies releases
    them at once. SQLite leases the rows instead: they stay claimed until the lease runs out."""
    from django.db import connection

    from messaging.outbox.relay import Relay, RelayOptions

    pending_letters(queue_name, 30)
    first, second = Relay(RelayOptions(batch_size=20)), Relay(RelayOptions(batch_size=20))
    try:
        claimed = first.claim()
        assert len(claimed.messages) == 20
        rest = second.claim()
        assert len(rest.messages) == 10
        assert not {message.pk for message in claimed.messages} & {message.pk for message in rest.messages}
        assert second.claim() is None  # nothing else is due while the first batch is held
        if connection.vendor == "postgresql":
            # A worker records a delivery of a letter in flight: its foreign-key check (KEY SHARE)
            # passes the relay's lock at once instead of waiting for the batch to be recorded.
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = '2s'")
                Delivery.objects.create(message_id=claimed.messages[0].pk, queue=queue_name, delivery_tag=1)
        dead = claimed.db.connection.info.backend_pid if connection.vendor == "postgresql" else None
        claimed.db.close()  # the first relay dies without recording its batch
        if dead is not None:
            # Closing returns once the client has sent its goodbye; the server process then rolls the
            # claim back and releases its row locks on its own time. A claim before that skips the
            # rows still locked (SKIP LOCKED), so wait for the process to be gone.
            wait_for(lambda: backend_gone(dead), timeout=10, message="the dead relay's session to end")
        again = second.claim()
        if connection.vendor == "postgresql":
            assert sorted(message.pk for message in again.messages) == sorted(message.pk for message in claimed.messages)
        else:
            assert again is None  # leased for RelayOptions.lease_seconds
    finally:
        first.close()
        second.close()
    assert Message.objects.filter(status=Message.Status.PENDING).count() == 30  # no outcome recorded, nothing lost


def backend_gone(pid: int) -> bool:
    """PostgreSQL's server process `pid` has exited (its transaction was rolled back before that)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)", [pid])
        return cursor.fetchone()[0]


def test_the_claim_reads_the_due_index_even_with_stale_statistics(queue_name):
    """A burst of pending letters (a broker that was down) before PostgreSQL's statistics catch up:
    the claim still walks the partial index in due order, not a bitmap scan and a sort of the backlog."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from messaging.outbox.relay import Relay, RelayOptions

    if connection.vendor != "postgresql":
        pytest.skip("planner settings are PostgreSQL's; SQLite's claim is checked by the other relay tests")
    pending_letters(queue_name, 5000)
    Message.objects.update(status=Message.Status.PUBLISHED, next_attempt_at=None)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE messaging_message")  # statistics of a table of published letters
    pending_letters(queue_name, 5000)
    relay = Relay(RelayOptions(batch_size=100))
    try:
        first = relay.claim()  # on one of the relay's two connections; the next claim takes the other
        db = next(db for db in relay.claims.databases if db is not first.db)
        with CaptureQueriesContext(db) as queries:
            batch = relay.claim()
        assert len(batch.messages) == 100 and batch.db is db
        with db.cursor() as cursor:  # in the claim's transaction, with its settings
            cursor.execute("EXPLAIN " + queries.captured_queries[-1]["sql"])
            plan = "\n".join(row[0] for row in cursor.fetchall())
        assert "Index Scan using message_relay_idx" in plan and "Sort" not in plan, plan
    finally:
        relay.close()


def test_relay_waits_out_a_database_outage(amqp, queue_name, monkeypatch, caplog):
    """A database error (here injected into the first claim) is logged and retried with backoff;
    the relay then publishes everything. With --once it exits 1 instead."""
    import threading

    from django.db import OperationalError

    from messaging.outbox.relay import Relay, RelayOptions

    amqp.queue_declare(queue_name, durable=True)
    pending_letters(queue_name, 5)
    real_claim, failures = Relay.claim, []

    def claim(self):
        if not failures:
            failures.append(1)
            raise OperationalError("connection refused (injected)")
        return real_claim(self)

    monkeypatch.setattr(Relay, "claim", claim)
    assert Relay(RelayOptions(once=True)).run() == 1
    assert "database unavailable" in caplog.text and "the rest stays pending" in caplog.text
    failures.clear()
    relay = Relay(RelayOptions(idle_seconds=0.1))
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        wait_for(lambda: not Message.objects.pending().exists(), timeout=30, message="the relay to publish")
    finally:
        relay.request_stop()
        thread.join(timeout=10)
    assert "retrying in" in caplog.text
    assert Message.objects.filter(status=Message.Status.PUBLISHED).count() == 5
    assert queue_depth(queue_name) == (5, 0)
