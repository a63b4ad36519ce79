"""Peek: copies of the messages at the head of a queue, read through the management API and put back at once.

RabbitMQ has no read that leaves a message untouched: the management API's get with
`ack_requeue_true` takes each message and requeues it, so it comes back marked redelivered, a
consumer may receive it a moment later, and a quorum queue counts the delivery (which can reach
its delivery-limit). `NOTICE` says so wherever a page or the API peeks.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from messaging.amqp import management
from messaging.amqp.codec import stored_message_id
from messaging.amqp.deaths import Death, deaths

MAX_PEEK = 50  # messages a peek takes from the head of a queue at most
BODY_BYTES = 16 * 1024  # of each body, the management API sends this much at most (`truncate`)

NOTICE = ("Peeking takes the messages from the head of the queue and puts them back at once: they are marked "
          "redelivered, consumers may see them a moment later, and on a quorum queue their delivery count rises "
          "(a delivery-limit can then drop or dead-letter them). The queue's message count is unchanged.")


@dataclass(frozen=True, kw_only=True)
class Peeked:
    """One message as a peek saw it: the part of its body sent, its size, headers and properties."""

    position: int  # 1 for the head of the queue
    message_id: str  # as `Message.message_id` stores it ('' when it has none)
    body: bytes  # at most BODY_BYTES of it
    size: int  # the whole body's size
    headers: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)  # the other properties (headers apart)
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    deaths: tuple[Death, ...] = ()
    remaining: int | None = None  # ready messages behind it when it was taken (the broker's message_count)

    @property
    def truncated(self) -> bool:
        return len(self.body) < self.size


def peek(queue: str, *, count: int, body_bytes: int = BODY_BYTES) -> list[Peeked] | None:
    """Up to `count` (at most MAX_PEEK) messages at the head of `queue`, each put back at once;
    None when there is no such queue. Raises `ManagementUnavailable` when the management API cannot tell."""
    answer = management.get_requeued(queue, count=max(1, min(count, MAX_PEEK)), truncate=body_bytes)
    if answer is None:
        return None
    return [_peeked(position, item) for position, item in enumerate(answer, 1) if isinstance(item, dict)]


def _peeked(position: int, item: dict) -> Peeked:
    properties = dict(item.get("properties") or {}) if isinstance(item.get("properties"), dict) else {}
    headers = properties.pop("headers", None)
    headers = headers if isinstance(headers, dict) else {}
    raw_id = properties.get("message_id")
    message_id = stored_message_id(raw_id)[0] if isinstance(raw_id, str) and raw_id else ""
    body = _payload(item.get("payload"), item.get("payload_encoding"))
    size, remaining = item.get("payload_bytes"), item.get("message_count")
    return Peeked(
        position=position, message_id=message_id, body=body,
        size=size if type(size) is int and size >= len(body) else len(body),
        headers=headers, properties=properties, exchange=str(item.get("exchange") or ""),
        routing_key=str(item.get("routing_key") or ""), redelivered=bool(item.get("redelivered")),
        deaths=tuple(deaths(headers)), remaining=remaining if type(remaining) is int else None,
    )


def _payload(payload, encoding) -> bytes:
    if not isinstance(payload, str):
        return b""
    if encoding == "base64":
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return payload.encode()
    return payload.encode("utf-8", "surrogatepass")
