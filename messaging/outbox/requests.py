"""Request/reply (RabbitMQ tutorial 6): publish a request with reply_to and a correlation_id, wait for its reply.

The form, the API and `manage.py publish --wait-reply` call `publish_request`. The request is
written and committed as every letter is, then published; nothing is held open in the database
while the reply is awaited. The reply is recorded as a `Message` of its own (origin `external`: its
producer is the server that answered), with its `Delivery`, and `in_reply_to` names the request.

Two ways to receive it, chosen by the request's reply_to:

* empty (or `amq.rabbitmq.reply-to`): direct reply-to, on a channel of the request's own. The
  request is published there, not by the relay: if the broker does not confirm it, it is written
  failed, since a later publish could not carry a reply back to anyone. A reply after the wait is
  dropped by the broker.
* a queue's name: the request goes through the outbox (the relay retries it), and a `consume`
  worker on that queue records the reply and links it (`messaging.consumer.linking`); the wait
  watches the database for that link. A reply after the wait is linked all the same.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

from messaging import conf
from messaging.amqp.replies import DIRECT_REPLY_TO, Requester
from messaging.amqp.subscription import Received
from messaging.consumer.recording import record_batch
from messaging.errors import ConnectionLost, InvalidMessage
from messaging.models import Message
from messaging.outbox.publishing import create_message, publish_message

logger = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 30.0  # the longest the form and the API wait for a reply (a web request must end)
COMMAND_MAX_WAIT_SECONDS = 3600.0  # `manage.py publish --wait-reply`
LINK_POLL_SECONDS = 0.2  # how often the database is asked for a reply recorded by a worker
NO_RETRY = "not retried: its reply would have nowhere to go (direct reply-to lives as long as the request's channel)"


@dataclass(kw_only=True)
class RequestOutcome:
    """A request as published, its reply (None when none came in time) and how long was waited."""

    request: Message
    reply: Message | None
    wait: float  # seconds asked for
    waited: float  # seconds it took

    @property
    def direct(self) -> bool:
        return (self.request.properties or {}).get("reply_to") == DIRECT_REPLY_TO

    @property
    def note(self) -> str:
        """One sentence for the page, the API and the command."""
        if self.reply is not None:
            return f"Reply {self.reply.message_id} after {self.waited:.2f} s."
        if self.request.status != Message.Status.PUBLISHED:
            return f"Not published ({self.request.status}): no reply to wait for."
        if self.direct:
            return (f"No reply within {self.wait:g} s; a reply coming later is dropped by the broker "
                    "(direct reply-to).")
        return (f"No reply recorded within {self.wait:g} s; a `consume` worker on "
                f"{self.request.properties['reply_to']!r} links one when it comes.")


def wait_seconds(value: Any, *, maximum: float = MAX_WAIT_SECONDS) -> float | None:
    """`value` as seconds to wait for a reply: None for no wait (None or ''), else a number over 0 and at most
    `maximum`; raises `InvalidMessage` with a sentence otherwise."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidMessage("wait_reply must be a number of seconds.")
    if not 0 < value <= maximum:
        raise InvalidMessage(f"wait_reply must be more than 0 and at most {maximum:g} seconds.")
    return float(value)


def publish_request(*, wait: float, **fields: Any) -> RequestOutcome:
    """Write the request (`create_message`'s arguments) and commit it, publish it with reply_to and a
    correlation_id (a UUID when none is given), and wait up to `wait` seconds for its reply.

    Call it outside a transaction: the request is committed before it is published, and the wait
    holds no transaction open. The request is recorded whether or not a reply comes.
    """
    if connection.in_atomic_block:
        raise RuntimeError("publish_request commits the request before waiting: call it outside a transaction")
    properties = dict(fields.pop("properties", None) or {})
    properties["reply_to"] = properties.get("reply_to") or DIRECT_REPLY_TO
    fields["correlation_id"] = fields.get("correlation_id") or str(uuid.uuid4())
    direct = properties["reply_to"] == DIRECT_REPLY_TO
    with transaction.atomic():
        request = create_message(**fields, properties=properties, publish_after_commit=not direct)
    started = time.monotonic()
    if direct:
        reply = _over_direct_reply_to(request, wait=wait)
    else:
        reply = _linked_reply(request, wait=wait) if request.status == Message.Status.PUBLISHED else None
    outcome = RequestOutcome(request=request, reply=reply, wait=wait, waited=time.monotonic() - started)
    logger.info("message_id=%s request %s reply=%s waited=%.3f", request.message_id, request.status,
                reply.message_id if reply else "none", outcome.waited, extra={"message_id": request.message_id})
    return outcome


def _over_direct_reply_to(request: Message, *, wait: float) -> Message | None:
    """Publish `request` on a requester's channel and record the reply that comes there within `wait` seconds."""
    requester = Requester(timeout=conf.get("MAILROOM_PUBLISH_TIMEOUT"))
    received = None
    try:
        publish_message(request, via=requester, no_retry=NO_RETRY)
        if request.status == Message.Status.PUBLISHED:
            received = requester.wait(correlation_id=request.correlation_id, seconds=wait)
    except ConnectionLost as exc:  # published; the reply can no longer come
        logger.warning("message_id=%s lost the connection awaiting its reply: %s", request.message_id, exc,
                       extra={"message_id": request.message_id})
    finally:
        requester.close()
    return record_reply(received, request=request) if received is not None else None


def record_reply(received: Received, *, request: Message) -> Message | None:
    """Record a reply as a `Message` with its (acked) `Delivery`, its in_reply_to the request."""
    settlement = record_batch([received], worker_id=None)[0]
    if settlement.message_id == request.pk:  # a server that copies the request's message_id into its reply
        logger.warning("message_id=%s its reply carried its message_id: recorded as a delivery of the request",
                       request.message_id, extra={"message_id": request.message_id})
        return None
    # The recording links it by correlation_id to the latest such request; this one is the one it answers.
    Message.objects.filter(pk=settlement.message_id).update(in_reply_to=request)
    return Message.objects.get(pk=settlement.message_id)


def _linked_reply(request: Message, *, wait: float) -> Message | None:
    """The reply a `consume` worker records and links to `request` within `wait` seconds, else None."""
    deadline = time.monotonic() + wait
    while True:
        reply = Message.objects.filter(in_reply_to=request).order_by("created_at", "pk").first()
        if reply is not None or time.monotonic() >= deadline:
            return reply
        time.sleep(min(LINK_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
