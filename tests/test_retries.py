"""Delayed retries through retry queues, and a dead-letter queue by name (`consume --retry-delays`,
`--dead-letter-queue`): real workers, a handler that always fails, the real broker."""
from __future__ import annotations

import signal
import uuid
from datetime import timedelta

import pika
import pytest
from django.core.management import CommandError, call_command

from messaging.consumer.recording import Received, record_batch, record_settled
from messaging.consumer.retries import RETRY_OF
from messaging.models import Delivery
from tests.conftest import (
    delete_queue,
    management_api,
    queue_depth,
    rabbitmq_vhost,
    wait_for,
)
from tests.consuming_checks import connect, consumers, publish

pytestmark = pytest.mark.django_db(transaction=True)

FAIL = "tests.handlers.fail"


@pytest.fixture
def names():
    """(queue, dead-letter queue) of this test's own; they, their retry queues and exchange are deleted afterwards."""
    queue = f"retry-{uuid.uuid4().hex[:10]}"
    dlq = f"{queue}-dead"
    yield queue, dlq
    for name in (queue, dlq, *(f"{queue}.retry.{d}" for d in ("1s", "2s"))):
        delete_queue(name)
    conn = connect()
    conn.channel().exchange_delete(exchange=dlq)
    conn.close()


def consume(manage, queue, dlq, *extra):
    worker = manage("consume", queue, "--handler", FAIL, "--dead-letter-queue", dlq, *extra)
    wait_for(lambda: consumers(queue) == 1 or worker.proc.poll() is not None, message="the worker to consume")
    assert worker.proc.poll() is None, worker.output
    return worker


def trail(queue, message_id):
    return list(Delivery.objects.filter(queue=queue, message__message_id=message_id).order_by("pk"))


def assert_retried_then_dead(queue, message_id, delays):
    rows = trail(queue, message_id)
    assert [(d.attempt, d.status, d.retry_delay) for d in rows] == [
        *((n, "requeued", delay) for n, delay in enumerate(delays, 1)), (len(delays) + 1, "rejected", None),
    ], message_id
    for before, after, delay in zip(rows, rows[1:], delays):
        assert after.received_at - before.received_at >= delay  # never back before its delay
        assert after.dead_lettered_from == f"{queue}.retry.{int(delay.total_seconds())}s"
        assert after.death_reason == "expired" and not after.duplicate
    assert rows[0].death_reason == ""
    return rows


def test_each_letter_waits_each_delay_then_sits_in_the_dead_letter_queue(names, manage):
    queue, dlq = names
    worker = consume(manage, queue, dlq, "--retry-delays", "1s,2s")
    ids = publish(queue, 20)
    wait_for(lambda: queue_depth(dlq)[0] == 20, timeout=40, message="20 letters in the dead-letter queue")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, worker.output
    for message_id in ids:
        assert_retried_then_dead(queue, message_id, [timedelta(seconds=1), timedelta(seconds=2)])
    assert queue_depth(queue)[0] == queue_depth(f"{queue}.retry.1s")[0] == queue_depth(f"{queue}.retry.2s")[0] == 0

    # Consuming the dead-letter queue records each letter's death: rejected by `queue`, after the retries.
    reader = manage("consume", dlq, "--max-messages", "20", "--inactivity-timeout", "20")
    assert reader.wait(timeout=30) == 0, reader.output
    dead = Delivery.objects.filter(queue=dlq)
    assert dead.count() == 20
    assert set(dead.values_list("dead_lettered_from", "death_reason", "death_count", "death_exchange")) == {
        (queue, "rejected", 1, ""),
    }
    assert {tuple(keys) for keys in dead.values_list("death_routing_keys", flat=True)} == {(queue,)}
    assert all(d.died_at is not None for d in dead)
    assert set(dead.values_list("message__message_id", flat=True)) == set(ids)  # filed under the same letters


def test_the_count_survives_a_worker_killed_between_attempts_on_a_quorum_queue(names, manage):
    queue, dlq = names
    options = ("--queue-type", "quorum", "--retry-delays", "2s,2s")
    first = consume(manage, queue, dlq, *options)
    [message_id] = publish(queue, 1)
    # Its first failure is settled (the copy confirmed, the original acked): kill -9 while it waits.
    wait_for(lambda: Delivery.objects.filter(queue=queue, status="requeued").exists(), message="a first retry")
    first.proc.kill()
    first.wait()
    second = consume(manage, queue, dlq, *options)
    wait_for(lambda: queue_depth(dlq)[0] == 1, timeout=30, message="the letter dead-lettered")
    second.signal(signal.SIGTERM)
    assert second.wait(timeout=15) == 0, second.output
    rows = assert_retried_then_dead(queue, message_id, [timedelta(seconds=2), timedelta(seconds=2)])
    assert rows[0].worker_id != rows[1].worker_id == rows[2].worker_id  # attempts 2 and 3 by the new worker
    # The retry queue and the dead-letter queue are of the queue's type (message TTL: quorum queues since 3.10).
    vhost = rabbitmq_vhost().replace("/", "%2F")
    assert [management_api(f"queues/{vhost}/{name}")["type"] for name in (queue, dlq)] == ["quorum", "quorum"]
    assert management_api(f"exchanges/{vhost}/{dlq}")["durable"]  # as durable as the queue, whatever --durable says
    assert management_api(f"queues/{vhost}/{queue}.retry.2s")["arguments"] == {
        "x-queue-type": "quorum", "x-message-ttl": 2000, "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
    }


def test_a_retry_queue_deleted_under_the_worker_is_declared_again_and_nothing_is_lost(names, manage):
    queue, dlq = names
    worker = consume(manage, queue, dlq, "--retry-delays", "1s")
    delete_queue(f"{queue}.retry.1s")
    [message_id] = publish(queue, 1)
    # The copy comes back unroutable: nothing acked, the worker reconnects (declaring the retry queue again)
    # and the broker redelivers the letter, whose second attempt is its last.
    wait_for(lambda: queue_depth(dlq)[0] == 1, timeout=30, message="the letter dead-lettered")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, worker.output
    assert "reconnecting" in worker.output
    assert [(d.attempt, d.status, d.redelivered) for d in trail(queue, message_id)] == [
        (1, "requeued", False), (2, "rejected", True),
    ]
    assert queue_depth(f"{queue}.retry.1s")[0] == 0


def test_a_queue_without_the_dead_letter_exchange_is_refused_clearly(names, manage):
    queue, dlq = names
    conn = connect()
    conn.channel().queue_declare(queue=queue)  # as the tutorials declare it: no x-dead-letter-exchange
    conn.close()
    worker = manage("consume", queue, "--handler", FAIL, "--dead-letter-queue", dlq, "--retry-delays", "1s")
    assert worker.wait(timeout=30) == 1
    assert f"queue '{queue}' exists with other arguments" in worker.output
    assert "x-dead-letter-exchange" in worker.output and "delete the queue" in worker.output
    assert "Traceback" not in worker.output


def test_a_bad_delay_is_a_usage_error(manage):
    worker = manage("consume", "retry-never-declared", "--retry-delays", "1s,fast")
    assert worker.wait(timeout=30) == 2
    assert "'fast' is not a delay" in worker.output and "Traceback" not in worker.output


@pytest.mark.parametrize("args, error", [
    (["--retry-delays", "0s"], "more than zero"),
    (["--retry-delays", "1s", "--max-retries", "3"], "not both"),
    (["--retry-delays", "1s", "--exchange", "x"], "needs named queues"),
    (["--dead-letter-queue", "q"], "another queue"),
])
def test_bad_retry_options_are_refused(args, error):
    queues = [] if "--exchange" in args else ["q"]
    with pytest.raises(CommandError, match=error):
        call_command("consume", *queues, *args)


# --- a crash between a copy's confirm and its original's ack (the database side, no broker) ---------
def delivery(tag: int, *, redelivered: bool = False, headers: dict | None = None) -> Received:
    return Received(queue="work", consumer_tag="c", delivery_tag=tag, redelivered=redelivered, exchange="",
                    routing_key="work", properties=pika.BasicProperties(message_id="m-1", headers=headers), body=b"x")


def refuse(message):
    raise ValueError("refused")


def test_a_copy_that_comes_back_after_its_redelivered_original_is_a_duplicate():
    delays = (timedelta(seconds=1), timedelta(seconds=2))
    [failed] = record_batch([delivery(1)], worker_id=None, handlers={"work": refuse}, retry_delays=delays)
    assert failed.retry.delay == timedelta(seconds=1)
    assert Delivery.objects.get(pk=failed.delivery_id).retry_delay == timedelta(seconds=1)  # committed before the ack
    # The worker died after the copy's confirm, before the ack: the broker redelivers the original...
    [again] = record_batch([delivery(1, redelivered=True)], worker_id=None, handlers={"work": lambda m: None},
                           retry_delays=delays)
    record_settled([again])
    # ...and the copy comes back from the retry queue later: recorded, not handled again.
    death = {"queue": "work.retry.1s", "reason": "expired", "count": 1, "exchange": "", "routing-keys": ["work.retry.1s"]}
    [copy] = record_batch([delivery(2, headers={RETRY_OF: failed.delivery_id, "x-death": [death]})], worker_id=None,
                          handlers={"work": refuse}, retry_delays=delays)
    assert copy.duplicate and copy.action == "acked" and copy.retry is None
    row = Delivery.objects.get(pk=copy.delivery_id)
    assert (row.duplicate, row.dead_lettered_from, row.death_reason, row.attempt) == (True, "work.retry.1s", "expired", 3)
    assert Delivery.objects.get(pk=failed.delivery_id).status == "requeued"  # the redelivery marked it


def test_a_copy_is_not_a_duplicate_in_the_ordinary_course_nor_a_replayed_letter():
    delays = (timedelta(seconds=1),)
    [failed] = record_batch([delivery(1)], worker_id=None, handlers={"work": refuse}, retry_delays=delays)
    record_settled([failed])
    death = {"queue": "work.retry.1s", "reason": "expired", "count": 1}
    [copy] = record_batch([delivery(2, headers={RETRY_OF: failed.delivery_id, "x-death": [death]})], worker_id=None,
                          handlers={"work": refuse}, retry_delays=delays)
    assert not copy.duplicate and copy.action == "rejected" and copy.retry is None  # the last delay was used
    # A letter replayed from the dead-letter queue keeps the header, but it was last dead-lettered by "work".
    rejected = {"queue": "work", "reason": "rejected", "count": 1}
    [replayed] = record_batch([delivery(3, headers={RETRY_OF: failed.delivery_id, "x-death": [rejected, death]})],
                              worker_id=None, handlers={"work": lambda m: None}, retry_delays=delays)
    assert not replayed.duplicate
