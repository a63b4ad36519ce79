"""Retention: delete old history in small batches, each its own short transaction."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction

from messaging.models import Delivery, Message

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 5000
UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '90m', '2w' as a timedelta."""
    match = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text or "")
    if not match:
        raise ValueError(f"{text!r} is not an age like 30d, 12h, 90m or 2w")
    return timedelta(**{UNITS[match[2]]: int(match[1])})


@dataclass(frozen=True, kw_only=True)
class PruneResult:
    messages: int
    deliveries: int
    batches: int


def prunable(*, before: datetime, statuses: list[str]):
    return Message.objects.filter(created_at__lt=before, status__in=statuses)


def prune(*, before: datetime, statuses: list[str], batch_size: int = DEFAULT_BATCH, dry_run: bool = False,
          pause: float = 0.0) -> PruneResult:
    """Delete letters created before `before` with one of `statuses`, and their deliveries.

    Oldest first, `batch_size` letters per transaction: locks are held for one batch only, so the
    consumer and the pages carry on while a large history is pruned.
    """
    messages = prunable(before=before, statuses=statuses)
    if dry_run:
        return PruneResult(messages=messages.count(), deliveries=Delivery.objects.filter(message__in=messages).count(),
                           batches=0)
    total_messages = total_deliveries = batches = 0
    while True:
        with transaction.atomic():
            ids = list(messages.order_by("created_at", "id").values_list("pk", flat=True)[:batch_size])
            if not ids:
                break
            # Copies keep their content; only the link to a pruned original goes.
            Message.objects.filter(republished_from__in=ids).update(republished_from=None)
            Message.objects.filter(in_reply_to__in=ids).update(in_reply_to=None)  # a reply outlives its request
            deliveries = Delivery.objects.filter(message_id__in=ids)._raw_delete(Delivery.objects.db)
            removed = Message.objects.filter(pk__in=ids)._raw_delete(Message.objects.db)
        total_messages += removed
        total_deliveries += deliveries
        batches += 1
        logger.info("prune batch=%s messages=%s deliveries=%s", batches, removed, deliveries)
        if len(ids) < batch_size:
            break
        if pause:
            time.sleep(pause)
    return PruneResult(messages=total_messages, deliveries=total_deliveries, batches=batches)
