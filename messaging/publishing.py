"""Publishing a letter: write it as pending (the outbox), publish after commit, record the outcome.

The form, the API, the admin and `manage.py publish` all call `create_letter`; the relay calls
`publish_message` for whatever is still pending.
"""
from __future__ import annotations

import logging
import random
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from messaging import broker
from messaging.models import Message

logger = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0


class LetterError(ValueError):
    """The letter cannot be published as given (a clear message for the user)."""


def check_short_string(value: str, *, field: str) -> None:
    if len(value.encode("utf-8")) > broker.MAX_SHORTSTR_BYTES:
        raise LetterError(f"{field} is longer than {broker.MAX_SHORTSTR_BYTES} bytes (UTF-8).")


def validate_letter(
    *, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any], exchange_type: str = "",
) -> None:
    """Refuse what the broker would refuse, before anything is written."""
    check_short_string(exchange, field="The exchange name")
    check_short_string(routing_key, field="The routing key")
    if exchange.startswith("amq.") and exchange_type:
        raise LetterError("Exchanges named amq.* are reserved by RabbitMQ and cannot be declared.")
    if exchange_type and exchange_type not in broker.EXCHANGE_TYPES:
        raise LetterError(f"Unknown exchange type {exchange_type!r}.")
    if not exchange and not routing_key:
        raise LetterError("A queue name (routing key) is needed on the default exchange.")
    if len(body) > settings.MAILROOM_MAX_BODY_BYTES:
        raise LetterError(f"The body is {len(body)} bytes; the limit is {settings.MAILROOM_MAX_BODY_BYTES} bytes.")
    for key in headers:
        check_short_string(str(key), field=f"Header name {str(key)[:40]!r}")


def create_letter(
    *,
    routing_key: str,
    body: bytes,
    exchange: str = "",
    exchange_type: str = "",
    declare: bool = False,
    content_type: str = "",
    content_encoding: str = "",
    correlation_id: str = "",
    delivery_mode: int = 2,
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    message_id: str = "",
    origin: str = Message.Origin.FORM,
    user=None,
    republished_from: Message | None = None,
) -> Message:
    """Write a pending letter in the caller's transaction; it is published once that commits."""
    headers = headers or {}
    validate_letter(exchange=exchange, routing_key=routing_key, body=body, headers=headers,
                    exchange_type=exchange_type if declare else "")
    if message_id:
        check_short_string(message_id, field="The message_id")
        if Message.objects.filter(message_id=message_id).exists():
            raise LetterError(f"A letter with message_id {message_id!r} already exists.")
    message = Message(
        exchange=exchange, exchange_type=exchange_type, declare=declare, routing_key=routing_key,
        content_type=content_type, content_encoding=content_encoding, correlation_id=correlation_id,
        delivery_mode=delivery_mode, headers=broker.json_safe(headers), properties=properties or {},
        origin=origin, published_by=user if getattr(user, "is_authenticated", False) else None,
        republished_from=republished_from, status=Message.Status.PENDING,
        # The relay leaves the letter to this request for a while, so the two never race.
        next_attempt_at=timezone.now() + timedelta(seconds=settings.MAILROOM_RELAY_GRACE_SECONDS),
    )
    if message_id:
        message.message_id = message_id
    message.set_body(body)
    message.save()
    transaction.on_commit(lambda: publish_message(message))
    return message


def republish(original: Message, *, user=None) -> Message:
    """A new letter with `original`'s content and destination, recording where it came from."""
    return create_letter(
        exchange=original.exchange, exchange_type=original.exchange_type, declare=original.declare,
        routing_key=original.routing_key, body=bytes(original.body), content_type=original.content_type,
        content_encoding=original.content_encoding, correlation_id=original.correlation_id,
        delivery_mode=original.delivery_mode, headers=original.headers, properties=original.properties,
        origin=Message.Origin.REPUBLISH, user=user, republished_from=original,
    )


def retry_delay(attempts: int) -> timedelta:
    """Capped exponential backoff with full jitter for the relay's next attempt."""
    ceiling = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


def publish_message(message: Message) -> Message:
    """Publish one pending letter on this thread's long-lived channel and record the outcome."""
    Message.objects.filter(pk=message.pk).update(attempts=message.attempts + 1)
    message.attempts += 1
    try:
        broker.publisher().publish(message, declare=message.declare)
    except broker.Unroutable as exc:
        message.mark_unroutable(f"returned by the broker: {exc}")
        logger.warning("message_id=%s unroutable reason=%s", message.message_id, exc)
    except broker.PublishRefused as exc:
        message.mark_failed(str(exc))
        logger.warning("message_id=%s failed reason=%s", message.message_id, exc)
    except broker.BrokerError as exc:
        message.mark_retry(str(exc), delay=retry_delay(message.attempts))
        logger.warning("message_id=%s still pending attempt=%s reason=%s", message.message_id, message.attempts, exc)
    else:
        message.mark_published()
        logger.info("message_id=%s published to %s", message.message_id, message.destination)
    return message
