"""Filing a delivery: the letter it belongs to (its message_id, or for a redelivered one without, its
content), the names as their columns store them, and the row of a letter Mailroom did not publish."""
from __future__ import annotations

import hashlib
import json
import uuid

from messaging.amqp.codec import read_properties, stored_message_id, text_value
from messaging.amqp.subscription import Received
from messaging.models import Delivery, Message

EXTERNAL_ORIGIN = Message.Origin.EXTERNAL.value
EXTERNAL_STATUS = Message.Status.EXTERNAL.value


def stored_name(value) -> str:
    """An exchange or routing key as its column stores it: another producer's bytes may not be UTF-8,
    or hold NUL (escaped as six characters, so a 255-byte name can come out longer than its column)."""
    if type(value) is str and "\x00" not in value:
        return value
    return text_value(value)[:255]


def filed_message_id(r: Received, *, has_handler: bool) -> tuple[str, bytes | None]:
    """The message_id to file the delivery under, and the raw id when that text is not exactly it."""
    message_id = r.properties.message_id
    if message_id:
        return stored_message_id(message_id)
    if r.redelivered:
        # A message without message_id recorded before the consumer died: find it by its content.
        found = _match_by_content(r, has_handler=has_handler)
        if found:
            return found, None
    return str(uuid.uuid4()), None


def _match_by_content(r: Received, *, has_handler: bool) -> str | None:
    """The message whose latest delivery on this queue, of identical content, may have lost its ack.

    That latest delivery (a rejected one aside) decides. If it is 'acked' on a queue with a handler,
    the ack went out (a handler's outcome is written after the broker was told): a redelivered
    identical message is then another message, sent twice without a message_id, whose handler must
    run. Without a handler, 'acked' is written with the row, its ack to follow, which a crash may
    have cut off: it matches.
    """
    sha = hashlib.sha256(r.body).hexdigest()
    latest = (
        Delivery.objects.filter(
            queue=r.queue, message__body_sha256=sha, message__origin=Message.Origin.EXTERNAL,
            message__routing_key=r.routing_key,
        )
        .exclude(status=Delivery.Status.REJECTED)
        .order_by("-pk").values_list("message__message_id", "status", "handled_at").first()
    )
    if latest is None:
        return None
    message_id, status, handled_at = latest
    if status == Delivery.Status.ACKED and (has_handler or handled_at is not None):
        return None
    return message_id


def external_message_row(r: Received, message_id: str, received_at, *, sha256: str = "",
                          raw_id: bytes | None = None) -> tuple:
    """A `Message` row (MESSAGE_COLUMNS) for a message Mailroom did not publish.

    `received_at` is already adapted for the database; `sha256` is the body's, when already known. The JSON columns are given as JSON text,
    as Django's adapter writes them on SQLite (json.dumps, no encoder); PostgreSQL reads that text
    as jsonb, in COPY and in a statement's literals alike. psycopg's Jsonb wrapper would cost
    ~12 µs more a row in COPY.
    """
    p = read_properties(r.properties)
    body = bytes(r.body)
    return (
        message_id, EXTERNAL_ORIGIN, EXTERNAL_STATUS, r.exchange, "", r.routing_key,
        False, body, len(body), sha256 or hashlib.sha256(body).hexdigest(), p["content_type"][:255],
        p["content_encoding"][:255], p["correlation_id"], p["delivery_mode"],
        json.dumps(p["headers"]) if p["headers"] else "{}",
        json.dumps(p["properties"]) if p["properties"] else "{}", "", 0, received_at, raw_id,
    )
