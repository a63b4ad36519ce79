"""Reconciliation: letters published but never delivered, and Mailroom's counts against the broker's."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Exists, OuterRef
from django.utils import timezone

from messaging.amqp.connection import queue_states
from messaging.models import Delivery, Message, StreamOffset

logger = logging.getLogger(__name__)

# How far back before the cutoff to look: the question is about recent traffic, and an unbounded
# anti-join over the whole history would read every letter ever published.
DEFAULT_LOOKBACK = timedelta(hours=24)


def undelivered(*, minutes: int, lookback: timedelta = DEFAULT_LOOKBACK, limit: int | None = 50):
    """Letters published over `minutes` ago (within `lookback` before that) with no delivery of theirs recorded."""
    cutoff = timezone.now() - timedelta(minutes=minutes)
    messages = (
        Message.objects.filter(status=Message.Status.PUBLISHED, published_at__lte=cutoff,
                               published_at__gt=cutoff - lookback)
        # A delivery marked as not the letter's (another body under its message_id, or a queue its
        # publish never routed to) says nothing of where the letter went; a stream tap's reading
        # says it passed by, not that a consumer got it.
        .filter(~Exists(Delivery.objects.trusted().consumed().filter(message=OuterRef("pk"))))
        .defer("body", "headers", "properties")
        .order_by("-published_at", "-id")
    )
    return messages[:limit] if limit else messages


@dataclass(frozen=True, kw_only=True)
class QueueCheck:
    """One queue seen from both sides: Mailroom's undelivered letters and what the broker holds."""

    queue: str
    undelivered: int  # letters published to the queue (default exchange) and never delivered
    ready: int | None  # messages ready in the broker; None when the queue does not exist
    consumers: int | None

    @property
    def mismatch(self) -> bool:
        """The broker holds fewer messages than Mailroom has letters waiting: some were lost."""
        return self.undelivered > (self.ready or 0)


def compare_queues(*, minutes: int, lookback: timedelta = DEFAULT_LOOKBACK, max_queues: int = 50) -> list[QueueCheck]:
    """Per queue a letter was published to directly (default exchange): Mailroom's count vs the broker's.

    A published letter with no delivery must still be ready in its queue (Mailroom records a
    delivery before it acks). Counts come from passive declares, which are exact and immediate
    (the management API's figures lag by a few seconds). Letters sent through other exchanges are
    not compared: which queues they reached depends on bindings at the time.
    """

    waiting: dict[str, int] = {}
    for routing_key in undelivered(minutes=minutes, lookback=lookback, limit=None).filter(
            exchange="").values_list("routing_key", flat=True).iterator():
        waiting[routing_key] = waiting.get(routing_key, 0) + 1
    for stream in StreamOffset.objects.filter(stream__in=list(waiting)).values_list("stream", flat=True):
        waiting.pop(stream, None)  # a stream keeps what it was sent, read or not: no "ready" to compare with
    checks = []
    compared = sorted(waiting.items(), key=lambda item: -item[1])[:max_queues]
    states = queue_states([name for name, _ in compared], timeout=2) if compared else {}
    for name, n in compared:
        state = states[name]
        checks.append(QueueCheck(queue=name, undelivered=n, ready=state.message_count if state else None,
                                 consumers=state.consumer_count if state else None))
    return checks
