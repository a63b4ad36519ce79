"""Handlers: the code a worker runs for each message of a queue, and what its failure means."""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from django.utils import timezone
from django.utils.module_loading import import_string

from messaging import conf
from messaging.amqp.codec import json_safe_str
from messaging.models import Delivery, Message

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Any]


def handler_paths(queues: Iterable[str], *, override: str = "") -> dict[str, str]:
    """Dotted handler paths per queue name: MAILROOM_QUEUE_HANDLERS, overridden by `override` (--handler).

    Each path is imported now, so that a typo fails at start rather than at the first message.
    """
    queues = tuple(queues)
    paths = {q: p for q, p in conf.get("MAILROOM_QUEUE_HANDLERS").items() if q in queues}
    if override:
        paths.update({q: override for q in queues or ("",)})
    for path in paths.values():
        import_string(path)
    return paths


def run_handler(*, handler: Handler, message_pk: int, delivery_pk: int, attempt: int, max_retries: int,
                transaction, message_id: str = "", queue: str = "") -> tuple[str, str]:
    """Run `handler` on the message and mark the delivery handled; return (action, error) for the broker.

    `transaction` (the writer's) wraps the handler and the mark, so that a failing handler's own
    writes are undone with it where the database allows. A failure requeues the message while
    `attempt` is within `max_retries`, and rejects it after that (to the queue's dead-letter exchange).
    `message_id` and `queue` only go into the log record of a failure.
    """
    try:
        with transaction:
            handler(Message.objects.get(pk=message_pk))
            Delivery.objects.filter(pk=delivery_pk).update(handled_at=timezone.now())
    except Exception:  # noqa: BLE001 — any handler error is recorded, never lost
        error = json_safe_str(traceback.format_exc()[-10000:])  # PostgreSQL refuses NUL in text
        action = Delivery.Status.REQUEUED if attempt <= max_retries else Delivery.Status.REJECTED
        logger.warning("delivery=%s message=%s handler failed attempt=%s action=%s",
                       delivery_pk, message_pk, attempt, action, extra={"message_id": message_id, "queue": queue})
        return action, error
    return Delivery.Status.ACKED, ""
