"""The outbox: write a message as pending, publish it after commit, record the outcome.

The form, the API, the admin and `manage.py publish` all call `create_message`; after the commit
`publish_message` publishes it on this thread's long-lived channel and writes the outcome before it
returns. Whatever stays pending (a crash between commit and publish, a broker that was down or
blocked, a nack) is published by the relay (`messaging.outbox.relay`).
"""
from __future__ import annotations

import contextlib
import json
import logging
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from messaging import conf
from messaging.amqp.codec import PROPERTY_NAMES, header_encoding_error, json_safe
from messaging.amqp.publisher import Publisher, publisher
from messaging.amqp.stored import DOUBLES, NUL_TEXT, from_json, to_json
from messaging.backoff import backoff_delay
from messaging.errors import (
    BrokerError,
    DuplicateMessageId,
    InvalidMessage,
    PublishRefused,
    Unroutable,
)
from messaging.models import Message
from messaging.outbox.validation import (
    check_exchange_type,
    check_short_string,
    clean_properties,
    validate_message,
)

logger = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 1.0  # the relay's first retry of a pending message, doubling up to the cap
RETRY_CAP_SECONDS = 300.0


def new_message(
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
    """A validated, unsaved pending message: the row `create_message` writes."""
    headers = headers or {}
    validate_message(exchange=exchange, routing_key=routing_key, body=body, headers=headers,
                    exchange_type=exchange_type if declare else "")
    properties = clean_properties(properties)
    for value, field in ((content_type, "content_type"), (content_encoding, "content_encoding"),
                         (correlation_id, "correlation_id")):
        check_short_string(value, field=field)
    if type(delivery_mode) is not int or delivery_mode not in (1, 2):
        raise InvalidMessage("delivery_mode must be 1 (transient) or 2 (persistent).")
    if not declare:  # validate_message checked it when declaring
        check_exchange_type(exchange_type)
    if message_id:
        check_short_string(message_id, field="The message_id")
    message = Message(
        exchange=exchange, exchange_type=exchange_type, declare=declare,
        routing_key=routing_key, content_type=content_type, content_encoding=content_encoding,
        correlation_id=correlation_id, delivery_mode=delivery_mode, headers=json_safe(headers),
        properties=properties, origin=origin,
        published_by=user if getattr(user, "is_authenticated", False) else None,
        republished_from=republished_from, status=Message.Status.PENDING,
        # The relay leaves the message to this request for a while, so the two never race.
        next_attempt_at=timezone.now() + timedelta(seconds=conf.get("MAILROOM_RELAY_GRACE_SECONDS")),
    )
    if message_id:
        message.message_id = message_id
    message.set_body(body)
    return message


def create_message(*, publish_after_commit: bool = True, **fields: Any) -> Message:
    """Write a pending message (`new_message`'s arguments) in the caller's transaction; published once that commits
    (unless `publish_after_commit` is false: the caller publishes it, see `messaging.outbox.requests`)."""
    message = new_message(**fields)
    if fields.get("message_id") and Message.objects.filter(message_id=message.message_id).exists():
        raise DuplicateMessageId(f"A letter with message_id {message.message_id!r} already exists.")
    return save_pending(message, publish_after_commit=publish_after_commit)


def save_pending(message: Message, *, publish_after_commit: bool = True) -> Message:
    """Write a message from `new_message` in the caller's transaction; published once that commits."""
    try:
        with transaction.atomic():  # a savepoint: the caller's transaction goes on after a refusal
            message.save()
    except IntegrityError as exc:  # the same message_id, written by another request meanwhile
        raise DuplicateMessageId(f"A letter with message_id {message.message_id!r} already exists.") from exc
    # robust: an error writing the outcome (the database gone since the commit) is logged and the
    # message stays pending for the relay, instead of failing a request whose message is saved.
    if publish_after_commit:
        transaction.on_commit(lambda: publish_message(message), robust=True)
    return message


# What a retry must repeat to be the same message: the stored content, destination, origin and sender.
CONTENT_FIELDS = ("exchange", "exchange_type", "declare", "routing_key", "body_size", "body_sha256", "content_type",
                  "content_encoding", "correlation_id", "delivery_mode", "headers", "properties", "origin",
                  "published_by_id")


def same_content(stored: Message, candidate: Message) -> bool:
    """Whether `candidate` (from `new_message`) repeats `stored` field for field (JSON compared canonically)."""
    def canonical(message: Message, name: str):
        value = getattr(message, name)
        # true == 1 and 1 == 1.0 in Python, not in the JSON a consumer reads.
        return json.dumps(value, sort_keys=True) if name in ("headers", "properties") else value

    return all(canonical(stored, name) == canonical(candidate, name) for name in CONTENT_FIELDS)


def republish(original: Message, *, user=None) -> Message:
    """A new message with `original`'s content and destination, recording where it came from and who sent it.

    Another producer's headers and properties are restored from their stored JSON (`stored.from_json`)
    and the copy stores them so that it sends them again as they came: doubles as doubles, bytes as
    bytes. A letter of Mailroom's own is stored as it will be sent, so its JSON is copied as it is.
    """
    headers, properties, _ = restored(original)
    problem = header_encoding_error(headers, floats_as_decimals=original.origin != Message.Origin.EXTERNAL)
    if problem:
        raise InvalidMessage(problem[0].upper() + problem[1:] + ".")
    message = new_message(
        exchange=original.exchange, exchange_type=original.exchange_type, declare=original.declare,
        routing_key=original.routing_key, body=bytes(original.body), content_type=original.content_type,
        content_encoding=original.content_encoding, correlation_id=original.correlation_id,
        delivery_mode=original.delivery_mode if original.delivery_mode in (1, 2) else 2,
        origin=Message.Origin.REPUBLISH, user=user, republished_from=original,
    )
    if original.origin == Message.Origin.EXTERNAL:
        message.headers, message.properties = to_json(headers, floats=DOUBLES), to_json(properties, floats=DOUBLES)
    else:
        message.headers = original.headers or {}
        message.properties = {k: v for k, v in (original.properties or {}).items() if k in PROPERTY_NAMES}
    return save_pending(message)


def republish_notes(original: Message) -> list[str]:
    """What a copy of `original` cannot send exactly as it was received (the confirmation pages name it)."""
    return restored(original)[2]


def restored(original: Message) -> tuple[dict, dict, list[str]]:
    """`original`'s headers and properties as pika's values, and notes on what cannot be restored exactly."""
    external, notes = original.origin == Message.Origin.EXTERNAL, []
    headers = from_json(original.headers or {}, external=external, notes=notes, where="headers")
    properties = {name: from_json(value, external=external, notes=notes, where=name)
                  for name, value in (original.properties or {}).items()
                  if name in PROPERTY_NAMES and value not in (None, "")}
    if external:
        for name in ("content_type", "content_encoding", "correlation_id"):
            value = getattr(original, name)
            if "\ufffd" in value or NUL_TEXT in value:
                notes.append(f"{name} was recorded with its invalid bytes as U+FFFD or NUL as the text {NUL_TEXT}; "
                             "the copy sends it as recorded")
        if properties.get("user_id"):
            notes.append(f"user_id {properties['user_id']!r} is sent again: RabbitMQ refuses the copy unless "
                         "Mailroom connects as that user")
    return headers, properties, notes


def retry_delay(attempts: int) -> timedelta:
    """When the relay tries a pending message again, after `attempts` attempts (see `backoff_delay`)."""
    return timedelta(seconds=backoff_delay(attempts - 1, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS))


def outcome_fields(status: str, reason: str = "", *, attempts: int = 1) -> dict[str, Any]:
    """The columns one UPDATE writes for an outcome (`attempts` = the attempt just made, for the backoff)."""
    now = timezone.now()
    if status == Message.Status.PUBLISHED:
        return {"status": status, "published_at": now, "last_error": "", "next_attempt_at": None}
    if status == Message.Status.UNROUTABLE:
        return {"status": status, "published_at": now, "last_error": reason, "next_attempt_at": None}
    if status == Message.Status.FAILED:
        return {"status": status, "last_error": reason, "next_attempt_at": None}
    return {"status": Message.Status.PENDING, "last_error": reason, "next_attempt_at": now + retry_delay(attempts)}


def log_fields(message) -> dict[str, str]:
    """A log record's `extra` about `message`: its message_id, and its queue when the default exchange
    routes it (straight to the queue its routing key names); otherwise the broker's bindings decide."""
    fields = {"message_id": message.message_id}
    if not message.exchange:
        fields["queue"] = message.routing_key
    return fields


def publish_once(message, *, via: Publisher | None = None) -> tuple[str, str]:
    """Publish `message` on this thread's long-lived channel (or `via`); return its outcome as (status, reason)."""
    try:
        (via or publisher()).publish(message, declare=message.declare)
    except Unroutable as exc:
        logger.warning("message_id=%s unroutable reason=%s", message.message_id, exc, extra=log_fields(message))
        return Message.Status.UNROUTABLE, f"returned by the broker: {exc}"
    except PublishRefused as exc:
        logger.warning("message_id=%s failed reason=%s", message.message_id, exc, extra=log_fields(message))
        return Message.Status.FAILED, str(exc)
    except BrokerError as exc:
        logger.warning("message_id=%s still pending attempt=%s reason=%s", message.message_id, message.attempts + 1,
                       exc, extra=log_fields(message))
        return Message.Status.PENDING, str(exc)
    return Message.Status.PUBLISHED, ""


def publish_message(message: Message, *, via: Publisher | None = None, no_retry: str = "") -> Message:
    """Publish one pending message on this thread's long-lived channel (or `via`) and write its outcome (one UPDATE).

    `no_retry`: when not empty, why the relay must not retry it: an outcome that would stay pending is
    written failed, with this reason after the broker's.
    """
    status, reason = publish_once(message, via=via)
    if no_retry and status == Message.Status.PENDING:
        status, reason = Message.Status.FAILED, f"{reason}; {no_retry}"
    message.attempts += 1
    fields = outcome_fields(status, reason, attempts=message.attempts)
    record_outcome(message.pk, fields)
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def record_outcome(pk: int, fields: dict[str, Any]) -> None:
    """`attempts + 1` and the outcome's columns in one UPDATE, on the driver's own cursor (on this hot
    path the ORM's and the cursor wrapper's overhead is as large as the write itself)."""
    connection.ensure_connection()
    write = _write_on_postgresql if connection.vendor == "postgresql" else _write_on_sqlite
    with connection.wrap_database_errors:  # Django's exceptions, and its note that the connection erred
        write(tuple(fields), [*outcome_params(connection, fields), pk])


def _write_on_sqlite(names: tuple[str, ...], params: list[Any]) -> None:
    pk_column = connection.ops.quote_name(Message._meta.pk.column)
    with contextlib.closing(connection.connection.cursor()) as cursor:
        cursor.execute(f"{outcome_update(names, mark='?')} WHERE {pk_column} = ?", params)


def _write_on_postgresql(names: tuple[str, ...], params: list[Any]) -> None:
    import psycopg

    sql = f"{outcome_update(names)} WHERE {connection.ops.quote_name(Message._meta.pk.column)} = %s"
    if not connection.in_atomic_block and connection.get_autocommit():
        # Its own transaction may commit without waiting for the WAL flush (an outcome lost in a
        # PostgreSQL crash leaves the message pending for the relay); `true`: this transaction only.
        sql += " AND set_config('synchronous_commit', 'off', true) IS NOT NULL"
    # Bound server-side, so that psycopg prepares it after a few runs (the connection's prepare_threshold).
    with psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, params)


def outcome_params(db, fields: dict[str, Any]) -> list[Any]:
    """The values of `fields` as the database connection `db` takes them, in order."""
    meta = Message._meta
    return [meta.get_field(name).get_db_prep_save(value, db) for name, value in fields.items()]


def outcome_update(names: tuple[str, ...], *, mark: str = "%s") -> str:
    """`UPDATE … SET attempts = attempts + 1, <name> = <mark>, …` of an outcome; the caller adds its WHERE."""
    meta, quote = Message._meta, connection.ops.quote_name
    attempts = quote(meta.get_field("attempts").column)
    sets = ", ".join(f"{quote(meta.get_field(name).column)} = {mark}" for name in names)
    return f"UPDATE {quote(meta.db_table)} SET {attempts} = {attempts} + 1, {sets}"
