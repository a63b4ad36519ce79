"""The worker's bound in bytes (`consumer.buffer`), its option, and the worker leaving its connection unread when full."""
from __future__ import annotations

import pika
import pytest
from django.core.management.base import CommandError

from messaging.amqp.subscription import Received
from messaging.consumer import worker as worker_module
from messaging.consumer.buffer import ByteBudget, next_batch
from messaging.consumer.worker import ConsumeOptions, Consumer
from messaging.management.commands.consume import Command, byte_size
from messaging.models import Delivery
from tests.unit.test_consumer_seam import FakeSubscription


def received(tag: int, size: int, message_id: str = "") -> Received:
    return Received(queue="q", consumer_tag="ctag", delivery_tag=tag, redelivered=False, exchange="", routing_key="q",
                    properties=pika.BasicProperties(message_id=message_id or f"m-{tag}"), body=b"x" * size)


@pytest.mark.parametrize("text, size", [("65536", 65536), ("512K", 512 * 1024), ("64M", 64 * 2**20), ("64MiB", 64 * 2**20),
                                        ("1g", 2**30), ("2GB", 2 * 2**30)])
def test_a_size_is_read_in_bytes_or_with_a_binary_suffix(text, size):
    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["0", "-1", "0M", "lots", "M", "", "1.5M"])
def test_a_bad_size_is_refused_by_the_option(text):
    with pytest.raises(ValueError):
        byte_size(text)
    parser = Command().create_parser("manage.py", "consume")
    with pytest.raises(CommandError, match="--max-unacked-bytes: invalid byte_size value"):
        parser.parse_args(["q", "--max-unacked-bytes", text])


def test_a_batch_takes_a_share_of_the_bytes_and_at_least_one_delivery():
    budget = ByteBudget(4000)  # a batch: 1000 bytes
    pending = [received(tag, 400) for tag in range(1, 6)]
    assert [r.delivery_tag for r in next_batch(pending, count=500, budget=budget, in_flight=())] == [1, 2]
    huge = [received(1, 10_000), received(2, 10)]
    assert [r.delivery_tag for r in next_batch(huge, count=500, budget=budget, in_flight=())] == [1]
    for r in pending:
        budget.take(r)
    assert budget.held == 2000 and not budget.full
    budget.take(received(9, 2000))
    assert budget.full
    budget.release(4000)
    assert budget.held == 0 and not budget.full


class CountingSubscription(FakeSubscription):
    """Hands the worker one delivery per read and notes the body bytes it held unacked at each read."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sizes = {r.delivery_tag: len(r.body) for r in self.plan}
        self.acked: set[int] = set()
        self.held_at_reads: list[int] = []

    def process(self, seconds: float) -> None:
        self.held_at_reads.append(sum(size for tag, size in self.sizes.items() if tag not in self.acked
                                      and tag not in {r.delivery_tag for r in self.plan}))
        if self.plan:
            self.on_delivery(self.plan.pop(0))

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        super().ack(delivery_tag, multiple=multiple)
        self.acked |= {t for t in self.sizes if t <= delivery_tag} if multiple else {delivery_tag}


@pytest.mark.django_db(transaction=True)
def test_the_worker_reads_nothing_more_while_it_holds_its_limit(monkeypatch):
    monkeypatch.setattr(worker_module, "Subscription", CountingSubscription)
    FakeSubscription.connections, FakeSubscription.script = [], [[received(tag, 1000) for tag in range(1, 41)]]
    worker = Consumer(ConsumeOptions(queues=("q",), max_messages=40, max_unacked_bytes=3000))
    assert worker.run() == 0
    [connection] = FakeSubscription.connections
    assert Delivery.objects.filter(status=Delivery.Status.ACKED).count() == 40
    assert max(connection.held_at_reads) <= 3000  # never read again once it held its limit
    assert max(connection.held_at_reads) >= 2000  # and yet it read ahead while batches were recorded
