"""Handlers: user code run for each letter; failures recorded, retried a bounded number of times, dead-lettered."""
from __future__ import annotations

import json
import signal
import uuid

import pytest

from messaging.models import Delivery, Message, Worker
from tests.conftest import delete_queue, subprocess_env, wait_for
from tests.consuming_checks import (
    acked_count,
    assert_exactly_once,
    connect,
    consumers,
    publish,
    queue_counts,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dead_letters(queue_name):
    """A fanout dead-letter exchange and a queue bound to it: (exchange, queue)."""
    exchange, dlq = f"{queue_name}-dlx", f"{queue_name}-dlq"
    conn = connect()
    channel = conn.channel()
    channel.exchange_declare(exchange=exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(queue=dlq, durable=True)
    channel.queue_bind(queue=dlq, exchange=exchange)
    conn.close()
    yield exchange, dlq
    delete_queue(dlq)
    conn = connect()
    conn.channel().exchange_delete(exchange=exchange)
    conn.close()


def handler_env(tmp_path, **extra):
    log = tmp_path / "handled.log"
    return log, subprocess_env(HANDLER_LOG=str(log), **extra)


def handled(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def consumer_ready(queue: str, count: int = 1):
    return lambda: consumers(queue) >= count


def test_poison_letter_is_retried_then_dead_lettered_while_others_flow(queue_name, dead_letters, manage, tmp_path):
    exchange, dlq = dead_letters
    log, env = handler_env(tmp_path)
    worker = manage("consume", queue_name, "--handler", "tests.handlers.fail_on_poison", "--max-retries", "2",
                    "--dead-letter-exchange", exchange, "--batch-size", "5", env=env)
    wait_for(consumer_ready(queue_name), message="the worker to consume")
    poison = publish(queue_name, 1, prefix="poison", body=b"poison!")
    good = publish(queue_name, 30)

    wait_for(lambda: queue_counts(dlq) == (1, 0), timeout=30, message="the poison letter in the dead-letter queue")
    wait_for(lambda: acked_count(queue_name) == 30, timeout=30, message="the good letters acked")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, worker.output

    attempts = list(Delivery.objects.filter(message__message_id=poison[0]).order_by("attempt"))
    assert [(d.attempt, d.status) for d in attempts] == [(1, "requeued"), (2, "requeued"), (3, "rejected")]
    assert all(d.redelivered for d in attempts[1:])
    assert all("Traceback" in d.error and "ValueError: poison letter" in d.error for d in attempts)
    assert all(d.handled_at is None and d.settled_at is not None for d in attempts)
    assert sorted(handled(log)) == sorted(good)  # every good letter handled once, the poison never
    assert set(Delivery.objects.filter(message__message_id__in=good).values_list("status", flat=True)) == {"acked"}
    assert Delivery.objects.filter(message__message_id__in=good, handled_at__isnull=True).count() == 0
    assert queue_counts(queue_name) == (0, 0)
    row = Worker.objects.get()
    assert (row.acked, row.requeued, row.rejected) == (30, 2, 1)
    assert "rejected=1" in worker.output


def test_retry_count_survives_a_worker_restart(queue_name, dead_letters, manage, tmp_path):
    exchange, dlq = dead_letters
    common = ["consume", queue_name, "--handler", "tests.handlers.fail", "--max-retries", "3",
              "--dead-letter-exchange", exchange]
    first = manage(*common, "--max-messages", "2", "--inactivity-timeout", "20")
    wait_for(consumer_ready(queue_name), message="the worker to consume")
    [message_id] = publish(queue_name, 1)
    assert first.wait(timeout=30) == 0, first.output
    assert list(Delivery.objects.order_by("attempt").values_list("attempt", "status")) == [
        (1, "requeued"), (2, "requeued"),
    ]
    assert queue_counts(queue_name) == (1, 0)

    second = manage(*common)
    wait_for(lambda: queue_counts(dlq) == (1, 0), timeout=30, message="the letter dead-lettered")
    second.signal(signal.SIGTERM)
    assert second.wait(timeout=15) == 0, second.output
    # Attempts 3 and 4 by the new process: the count came from the database, not from memory.
    assert list(Delivery.objects.order_by("attempt").values_list("attempt", "status")) == [
        (1, "requeued"), (2, "requeued"), (3, "requeued"), (4, "rejected"),
    ]
    assert Message.objects.get().message_id == message_id
    assert queue_counts(queue_name) == (0, 0)


def test_quorum_queue_counts_retries_with_x_delivery_count(queue_name, dead_letters, manage):
    exchange, dlq = dead_letters
    common = ["consume", queue_name, "--queue-type", "quorum", "--handler", "tests.handlers.fail",
              "--max-retries", "2", "--dead-letter-exchange", exchange]
    first = manage(*common, "--max-messages", "1", "--inactivity-timeout", "20")
    wait_for(consumer_ready(queue_name), message="the worker to consume")
    publish(queue_name, 1)
    assert first.wait(timeout=30) == 0, first.output
    # Forget the database's count: the quorum queue's x-delivery-count must carry it on.
    Delivery.objects.all().delete()

    second = manage(*common)
    wait_for(lambda: queue_counts(dlq) == (1, 0), timeout=30, message="the letter dead-lettered")
    second.signal(signal.SIGTERM)
    assert second.wait(timeout=15) == 0, second.output
    # The first worker's delivery (and, maybe, the redelivery it left unacked when it stopped) are
    # counted by the broker: the new worker starts at attempt 2 or 3, and rejects at 3.
    attempts = list(Delivery.objects.order_by("attempt").values_list("attempt", "status"))
    assert attempts in ([(2, "requeued"), (3, "rejected")], [(3, "rejected")]), attempts
    assert queue_counts(queue_name) == (0, 0)


def test_duplicates_are_recorded_but_not_handled_again(queue_name, manage, tmp_path):
    log, env = handler_env(tmp_path)
    twice = f"dup-{uuid.uuid4().hex[:8]}"
    publish(queue_name, 1, prefix=twice, declare=True)
    publish(queue_name, 1, prefix=twice)  # the same message_id again
    others = publish(queue_name, 3)
    worker = manage("consume", queue_name, "--handler", "tests.handlers.note", "--max-messages", "5",
                    "--inactivity-timeout", "20", env=env)
    assert worker.wait(timeout=30) == 0, worker.output
    publish(queue_name, 1, prefix=twice)  # and once more, to a later worker
    again = manage("consume", queue_name, "--handler", "tests.handlers.note", "--max-messages", "1",
                   "--inactivity-timeout", "20", env=env)
    assert again.wait(timeout=30) == 0, again.output

    letter = Message.objects.get(message_id=f"{twice}-0")
    deliveries = list(letter.deliveries.order_by("pk"))
    assert [(d.attempt, d.duplicate, d.status) for d in deliveries] == [
        (1, False, "acked"), (2, True, "acked"), (3, True, "acked"),
    ]
    assert deliveries[0].handled_at is not None and deliveries[1].handled_at is None
    assert sorted(handled(log)) == sorted([f"{twice}-0", *others])  # the duplicate's handler ran once
    assert Message.objects.count() == 4
    assert "duplicates=1" in worker.output and "duplicates=1" in again.output


def test_handlers_by_queue_from_the_setting(queue_name, manage, tmp_path):
    other = f"{queue_name}-other"
    log, env = handler_env(tmp_path, MAILROOM_QUEUE_HANDLERS=json.dumps({queue_name: "tests.handlers.note"}))
    handled_ids = publish(queue_name, 3, declare=True)
    publish(other, 2, declare=True)
    worker = manage("consume", queue_name, other, "--max-messages", "5", "--inactivity-timeout", "20", env=env)
    assert worker.wait(timeout=30) == 0, worker.output
    try:
        assert sorted(handled(log)) == sorted(handled_ids)
        assert Delivery.objects.filter(queue=other, handled_at__isnull=False).count() == 0
        assert_exactly_once(queue_name, handled_ids)
    finally:
        delete_queue(other)


def test_unknown_handler_is_refused_at_start(queue_name, manage):
    worker = manage("consume", queue_name, "--handler", "tests.handlers.nope")
    assert worker.wait(timeout=30) != 0
    assert "Cannot import the handler" in worker.output
