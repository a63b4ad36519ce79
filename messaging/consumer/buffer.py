"""The bytes a worker holds: bodies received and not yet acked, bounded by `--max-unacked-bytes`.

RabbitMQ bounds unacked deliveries only by count (it refuses a `prefetch_size`), so a few producers'
large messages could fill a prefetch of thousands with gigabytes. The worker therefore stops
reading from its connection while it holds `limit` bytes: what the broker sends meanwhile waits in
the socket and in the broker, and TCP's flow control holds the rest back. A batch takes at most a
share of the limit, so that several are recorded at once while the connection is read again.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from messaging.amqp.subscription import Received

if TYPE_CHECKING:
    from messaging.consumer.recording import Settlement

BATCH_SHARE = 4  # a batch holds at most this fraction of the limit (and at least one delivery)


@dataclass(frozen=True, kw_only=True)
class InFlight:
    """A batch being recorded on a database thread."""

    future: Future
    batch: list[Received]
    size: int  # its body bytes
    settled: list[Settlement]
    recorder: ThreadPoolExecutor
    # A message in this batch, or among the settlements it writes, waits for it to commit before it is
    # recorded again: its attempt number and duplicate check must see the earlier delivery, settled.
    message_ids: frozenset
    settling_ids: frozenset


class ByteBudget:
    """The body bytes received and not yet settled, against `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.batch_bytes = max(1, limit // BATCH_SHARE)
        self.held = 0

    @property
    def full(self) -> bool:
        """Whether the worker holds its limit: read nothing more until a batch is settled."""
        return self.held >= self.limit

    def take(self, received: Received) -> None:
        """A delivery came off the channel."""
        self.held += len(received.body)

    def release(self, size: int) -> None:
        """Deliveries of `size` body bytes were settled (or dropped)."""
        self.held = max(0, self.held - size)

    def clear(self) -> None:
        """The connection is gone: everything held goes back to the queue."""
        self.held = 0

    def worth_a_batch(self, pending: int, in_flight, *, batch_size: int) -> bool:
        """Whether enough waits (`pending` deliveries) to record a batch beside those `in_flight`: small
        batches cost more than they save."""
        waiting = self.held - sum(item.size for item in in_flight)
        return not in_flight or pending >= batch_size // 2 or waiting >= self.batch_bytes // 2

    def batch_end(self, pending: list[Received]) -> int:
        """How many of `pending` (already cut to the batch size) fit in one batch's share of bytes."""
        total = 0
        for i, r in enumerate(pending):
            total += len(r.body)
            if total > self.batch_bytes and i:
                return i
        return len(pending)


def next_batch(pending: list[Received], *, count: int, budget: ByteBudget, in_flight) -> list[Received]:
    """The first deliveries of `pending` to record together: up to `count` and a batch's share of bytes,
    stopping at a message that a batch still being recorded (`in_flight`) holds: it is recorded after
    that batch committed, so that its attempt number and duplicate check see the earlier delivery (a
    message without message_id is matched by content, so it waits for every batch)."""
    batch = pending[:count]
    del batch[budget.batch_end(batch):]  # more batches, and the connection read again, meanwhile
    if in_flight and batch:
        busy = frozenset().union(*(item.message_ids | item.settling_ids for item in in_flight))
        for i, r in enumerate(batch):
            message_id = r.properties.message_id
            if (message_id in busy) if message_id else r.redelivered:
                del batch[i:]
                break
    return batch


def body_bytes(batch: list[Received]) -> int:
    """The size of `batch`'s bodies."""
    return sum(len(r.body) for r in batch)
