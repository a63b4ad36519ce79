"""Telling the broker how recorded deliveries settled (ack, requeue, reject), and counting them.

A delivery requeued through a retry queue (`Settlement.retry`) is settled in two steps: its copy is
published to the retry queue and confirmed, then the original is acked (see `consumer.retries`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from messaging.amqp.retry_queues import retry_queue
from messaging.amqp.subscription import Received, Subscription
from messaging.consumer.recording import Settlement
from messaging.consumer.retries import copy_properties
from messaging.models import Delivery

logger = logging.getLogger(__name__)


@dataclass
class Counts:
    """What a worker has done since it started (logged at the end, saved with each heartbeat)."""

    received: int = 0
    acked: int = 0
    requeued: int = 0
    rejected: int = 0
    duplicates: int = 0
    reconnects: int = 0


class Acks:
    """The acks of one channel: one `multiple` ack for a whole batch where it covers nothing else."""

    def __init__(self, subscription: Subscription, counts: Counts) -> None:
        self._subscription = subscription
        self._counts = counts
        self._settled_below = 1  # every delivery tag below this one is settled on this channel
        self._settled_above: set[int] = set()

    def settle(self, settlements: list[Settlement], *, batch: list[Received] = ()) -> None:
        """Ack, requeue or reject each delivery (raises `ConnectionLost` if the channel is gone).

        `batch`: the deliveries as received, whose retry copies are published (and confirmed) first.
        """
        self._send_retries(settlements, batch)
        tags = sorted(s.delivery_tag for s in settlements)
        acked = Delivery.Status.ACKED
        all_acked = all(s.action == acked for s in settlements)
        if all_acked and tags[0] == self._settled_below and tags[-1] - tags[0] + 1 == len(tags):
            # `multiple` also acks every earlier unsettled tag, e.g. a delivery dropped unrecorded
            # while stopping: so only when the batch is all that is unsettled below its last tag.
            self._subscription.ack(tags[-1], multiple=True)
        else:
            for s in settlements:
                if s.action == acked or s.retry is not None:  # its copy is in the retry queue
                    self._subscription.ack(s.delivery_tag)
                else:
                    self._subscription.nack(s.delivery_tag, requeue=s.action == Delivery.Status.REQUEUED)
        self._settled_above.update(tags)
        while self._settled_below in self._settled_above:
            self._settled_above.discard(self._settled_below)
            self._settled_below += 1
        if all_acked:
            self._counts.acked += len(settlements)
        else:
            for s in settlements:
                setattr(self._counts, s.action, getattr(self._counts, s.action) + 1)
        self._counts.duplicates += sum(s.duplicate for s in settlements)
        if logger.isEnabledFor(logging.DEBUG):
            for s in settlements:
                logger.debug("delivery=%s tag=%s %s", s.delivery_id, s.delivery_tag, s.action)

    def _send_retries(self, settlements: list[Settlement], batch: list[Received]) -> None:
        """Publish each retry copy to its retry queue, confirmed, before its original is acked."""
        retries = [s for s in settlements if s.retry is not None]
        if not retries:
            return
        received = {r.delivery_tag: r for r in batch}
        for s in retries:
            r = received[s.delivery_tag]
            queue = retry_queue(r.queue, s.retry.delay)
            self._subscription.publish_copy(queue, body=r.body, properties=copy_properties(
                r.properties, retry_of=s.delivery_id, message_id=s.retry.message_id))
            logger.info("delivery=%s retry in %s via queue=%s", s.delivery_id, s.retry.delay, queue,
                        extra={"message_id": r.properties.message_id, "queue": r.queue})
