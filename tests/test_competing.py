"""Past one machine: competing `consume` workers on one queue, a cluster URL with a dead first address."""
from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
import urllib.request
import uuid

import pika
import pytest
from django.db import transaction
from django.db.models import Count

from messaging.models import Delivery, Message, Worker
from messaging.outbox.publishing import create_message
from tests.conftest import management_request, queue_depth, subprocess_env, wait_for

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.django_db(transaction=True)

BURST = 10_000
WORKERS = 3


def consumers(name: str) -> int:
    try:
        return queue_depth(name)[1]
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def test_three_workers_share_a_burst_and_record_each_letter_once(amqp, queue_name, manage):
    workers = [manage("consume", queue_name, "--inactivity-timeout", "10") for _ in range(WORKERS)]
    wait_for(lambda: consumers(queue_name) == WORKERS, timeout=60, message="three consumers on the queue")

    # The burst lands at once: published in one AMQP transaction.
    run = uuid.uuid4().hex[:8]
    amqp.tx_select()
    for i in range(BURST):
        amqp.basic_publish(
            exchange="", routing_key=queue_name, body=f"letter {i}".encode(),
            properties=pika.BasicProperties(message_id=f"burst-{run}-{i}", content_type="text/plain"),
        )
    amqp.tx_commit()
    landed = time.monotonic()
    acked = Delivery.objects.filter(queue=queue_name, status=Delivery.Status.ACKED)
    wait_for(lambda: acked.count() >= BURST, timeout=240, interval=0.5, message="every letter to be acked")
    elapsed = time.monotonic() - landed

    for worker in workers:
        assert worker.wait(timeout=240) == 0, worker.output[-3000:]

    assert Message.objects.filter(message_id__startswith=f"burst-{run}-").count() == BURST
    deliveries = Delivery.objects.filter(queue=queue_name)
    assert deliveries.count() == BURST  # each letter recorded once
    assert deliveries.values("message").distinct().count() == BURST
    assert set(deliveries.values_list("status", flat=True)) == {Delivery.Status.ACKED}
    assert not deliveries.filter(redelivered=True).exists()
    assert queue_depth(queue_name) == (0, 0)

    # The load was shared: every worker acked a real part of it.
    per_worker = dict(deliveries.values_list("worker").annotate(n=Count("id")).values_list("worker", "n"))
    assert len(per_worker) == WORKERS and None not in per_worker
    acked_logged = [int(re.search(r"acked=(\d+)", w.output).group(1)) for w in workers]
    assert sum(acked_logged) == BURST
    assert sorted(acked_logged) == sorted(per_worker.values())
    assert min(acked_logged) >= BURST // 10, acked_logged
    assert sorted(Worker.objects.values_list("acked", flat=True)) == sorted(acked_logged)
    logger.info("burst of %s recorded and acked in %.1fs (%.0f/s) by %s workers, shared as %s",
                BURST, elapsed, BURST / elapsed, WORKERS, acked_logged)


def test_a_dead_first_broker_address_is_skipped(settings, fresh_publisher, amqp, queue_name, manage):
    """RABBITMQ_URL lists a cluster's nodes; pika tries them in turn (the first is down here)."""
    real = settings.RABBITMQ_URL.split(",")[0]
    cluster = f"amqp://guest:guest@127.0.0.1:1/%2F,{real}"
    worker = manage("consume", queue_name, "--queue-type", "quorum", "--max-messages", "1",
                    "--inactivity-timeout", "30", env=subprocess_env(RABBITMQ_URL=cluster))
    wait_for(lambda: consumers(queue_name) == 1, timeout=30, message="the worker to consume")

    settings.RABBITMQ_URL = cluster  # fresh_publisher: this thread's publisher connects anew
    with transaction.atomic():
        letter = create_message(routing_key=queue_name, body=b"via the second address", declare=True)
    letter.refresh_from_db()
    assert letter.status == Message.Status.PUBLISHED, letter.last_error

    assert worker.wait(timeout=60) == 0, worker.output
    assert Delivery.objects.get(message=letter).status == Delivery.Status.ACKED
    assert queue_type(queue_name) == "quorum"
    assert amqp.queue_declare(queue=queue_name, passive=True).method.message_count == 0


def queue_type(name: str) -> str:
    """The queue's type from the management HTTP API (plugin enabled by scripts/services.sh)."""
    with urllib.request.urlopen(
        management_request(f"queues/%2F/{urllib.parse.quote(name, safe='')}"), timeout=10,
    ) as response:
        return json.load(response)["type"]
