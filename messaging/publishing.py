"""Publishing a letter: write it as pending (the outbox), publish after commit, record the outcome.

The form, the API, the admin and `manage.py publish` all call `create_letter`; after the commit
`publish_message` publishes it on this thread's long-lived channel. Whatever stays pending (a crash
between commit and publish, a broker that was down or blocked, a nack) is published by the relay
(`messaging.relay`), which records the outcomes of a batch itself (one UPDATE per outcome).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, connection, connections, transaction
from django.utils import timezone

from messaging import broker, outcome_in_flight
from messaging.backoff import backoff_delay
from messaging.models import Message

logger = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0
BLOCKED_PREFIX = "broker blocked"

# The standard AMQP properties a publisher may set besides message_id, content_type,
# content_encoding, correlation_id and delivery_mode (which have their own fields).
PROPERTY_FIELDS = ("priority", "reply_to", "expiration", "timestamp", "type", "user_id", "app_id")


class LetterError(ValueError):
    """The letter cannot be published as given (a clear message for the user)."""


def check_short_string(value: str, *, field: str) -> None:
    """At most 255 bytes of UTF-8 (an AMQP short string), and text a database can store (no NUL)."""
    if "\x00" in value:
        raise LetterError(f"{field} contains a NUL character.")
    if len(utf8(value, field=field)) > broker.MAX_SHORTSTR_BYTES:
        raise LetterError(f"{field} is longer than {broker.MAX_SHORTSTR_BYTES} bytes (UTF-8).")


def utf8(text: str, *, field: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (which JSON's \\ud800 escapes can carry) is refused clearly."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LetterError(f"{field} is not valid Unicode text ({exc.reason}).") from exc


def validate_letter(
    *, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any], exchange_type: str = "",
) -> None:
    """Refuse what the broker would refuse, before anything is written.

    Publishing to an existing `amq.*` exchange (amq.direct, amq.topic...) is fine; declaring one is
    refused by RabbitMQ (403), so a letter that asks to declare one is refused here.
    """
    check_short_string(exchange, field="The exchange name")
    check_short_string(routing_key, field="The routing key")
    if exchange.startswith("amq.") and exchange_type:
        raise LetterError("Exchanges named amq.* are reserved by RabbitMQ and cannot be declared; "
                          "publish to an existing one without declaring it.")
    check_exchange_type(exchange_type)
    if not exchange and not routing_key:
        raise LetterError("A queue name (routing key) is needed on the default exchange.")
    if len(body) > settings.MAILROOM_MAX_BODY_BYTES:
        raise LetterError(f"The body is {len(body)} bytes; the limit is {settings.MAILROOM_MAX_BODY_BYTES} bytes.")
    if not isinstance(headers, dict):
        raise LetterError("Headers must be an object of name: value.")
    check_header_table(headers)
    problem = broker.header_encoding_error(headers)
    if problem:
        raise LetterError(problem[0].upper() + problem[1:] + ".")


def check_exchange_type(exchange_type: str) -> None:
    if exchange_type and exchange_type not in broker.EXCHANGE_TYPES:
        raise LetterError(f"Unknown exchange type {exchange_type[:40]!r}.")


MAX_HEADER_DEPTH = 10


def check_header_table(table: dict, *, depth: int = 0) -> None:
    """Header names of at most 255 bytes; values a string, number, boolean, null, list or table,
    tables and lists nested at most `MAX_HEADER_DEPTH` deep."""
    if depth > MAX_HEADER_DEPTH:
        raise LetterError("Headers are nested too deeply.")
    for key, value in table.items():
        check_short_string(str(key), field=f"Header name {str(key)[:40]!r}")
        check_header_value(value, depth=depth)


def check_header_value(value: Any, *, depth: int) -> None:
    if depth > MAX_HEADER_DEPTH:
        raise LetterError("Headers are nested too deeply.")
    if isinstance(value, str):
        utf8(value, field="A header value")
        if "\x00" in value:  # PostgreSQL's JSON cannot hold it: it would be stored changed, as the text \u0000
            raise LetterError("A header value contains a NUL character, which cannot be stored as it is.")
    elif isinstance(value, dict):
        check_header_table(value, depth=depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_header_value(item, depth=depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise LetterError("A header number does not fit in 64 bits.")
    elif isinstance(value, float) and value - value != 0:  # json.loads reads NaN and Infinity
        raise LetterError("A header number must be finite (not NaN or Infinity).")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise LetterError(f"Unsupported header value type {type(value).__name__}.")


def clean_properties(properties: dict[str, Any] | None) -> dict[str, Any]:
    """The standard properties, checked (priority 0-255, expiration in ms, timestamp in seconds); empty ones dropped."""
    cleaned: dict[str, Any] = {}
    for name, value in (properties or {}).items():
        if name not in PROPERTY_FIELDS:
            raise LetterError(f"Unknown property {name!r}; known: {', '.join(PROPERTY_FIELDS)}.")
        if value is None or value == "":
            continue
        if name == "priority":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise LetterError("priority must be a whole number from 0 to 255.")
        elif name == "timestamp":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise LetterError("timestamp must be a whole number of seconds since 1970.")
        elif name == "expiration":
            value = str(value)
            if not value.isdigit() or not value.isascii():
                raise LetterError("expiration must be a whole number of milliseconds (as text), e.g. '60000'.")
            check_short_string(value, field=name)
        elif not isinstance(value, str):
            raise LetterError(f"{name} must be text.")
        else:
            check_short_string(value, field=name)
        cleaned[name] = value
    return cleaned


def decode_body(text: str, *, encoding: str) -> bytes:
    """The body bytes of a form or API payload given as 'string' (UTF-8) or 'base64'."""
    if encoding == "base64":
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LetterError(f"The body is not valid base64: {exc}") from exc
    if encoding not in ("string", ""):
        raise LetterError("The payload encoding must be 'string' or 'base64'.")
    return utf8(text, field="The body")


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
    properties = clean_properties(properties)
    for value, field in ((content_type, "content_type"), (content_encoding, "content_encoding"),
                         (correlation_id, "correlation_id")):
        check_short_string(value, field=field)
    if type(delivery_mode) is not int or delivery_mode not in (1, 2):
        raise LetterError("delivery_mode must be 1 (transient) or 2 (persistent).")
    if not declare:  # validate_letter checked it when declaring
        check_exchange_type(exchange_type)
    if message_id:
        check_short_string(message_id, field="The message_id")
        if Message.objects.filter(message_id=message_id).exists():
            raise LetterError(f"A letter with message_id {message_id!r} already exists.")
    message = Message(
        exchange=exchange, exchange_type=exchange_type, declare=declare,
        routing_key=routing_key, content_type=content_type, content_encoding=content_encoding,
        correlation_id=correlation_id, delivery_mode=delivery_mode, headers=broker.json_safe(headers),
        properties=properties, origin=origin,
        published_by=user if getattr(user, "is_authenticated", False) else None,
        republished_from=republished_from, status=Message.Status.PENDING,
        # The relay leaves the letter to this request for a while, so the two never race.
        next_attempt_at=timezone.now() + timedelta(seconds=settings.MAILROOM_RELAY_GRACE_SECONDS),
    )
    if message_id:
        message.message_id = message_id
    message.set_body(body)
    try:
        with transaction.atomic():  # a savepoint: the caller's transaction goes on after a refusal
            message.save()
    except IntegrityError as exc:  # the same message_id, written by another request meanwhile
        raise LetterError(f"A letter with message_id {message.message_id!r} already exists.") from exc
    # robust: an error writing the outcome (the database gone since the commit) is logged and the
    # letter stays pending for the relay, instead of failing a request whose letter is saved.
    transaction.on_commit(lambda: publish_message(message), robust=True)
    return message


def republish(original: Message, *, user=None) -> Message:
    """A new letter with `original`'s content and destination, recording where it came from and who sent it."""
    return create_letter(
        exchange=original.exchange, exchange_type=original.exchange_type, declare=original.declare,
        routing_key=original.routing_key, body=bytes(original.body), content_type=original.content_type,
        content_encoding=original.content_encoding, correlation_id=original.correlation_id,
        delivery_mode=original.delivery_mode if original.delivery_mode in (1, 2) else 2,
        headers=original.headers, origin=Message.Origin.REPUBLISH, user=user, republished_from=original,
        properties={k: v for k, v in (original.properties or {}).items() if k in PROPERTY_FIELDS},
    )


def retry_delay(attempts: int) -> timedelta:
    """When the relay tries a pending letter again, after `attempts` attempts (see `backoff_delay`)."""
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


def publish_once(message) -> tuple[str, str]:
    """Publish `message` on this thread's long-lived channel; return its outcome as (status, reason)."""
    try:
        broker.publisher().publish(message, declare=message.declare)
    except broker.Unroutable as exc:
        logger.warning("message_id=%s unroutable reason=%s", message.message_id, exc)
        return Message.Status.UNROUTABLE, f"returned by the broker: {exc}"
    except broker.PublishRefused as exc:
        logger.warning("message_id=%s failed reason=%s", message.message_id, exc)
        return Message.Status.FAILED, str(exc)
    except broker.BrokerError as exc:
        logger.warning("message_id=%s still pending attempt=%s reason=%s", message.message_id, message.attempts + 1, exc)
        return Message.Status.PENDING, str(exc)
    return Message.Status.PUBLISHED, ""


def publish_message(message: Message) -> Message:
    """Publish one pending letter on this thread's long-lived channel and record the outcome (one UPDATE).

    On PostgreSQL, outside a transaction, a `published` outcome is sent on the confirm and its
    answer read before the connection's next use (`messaging.outcome_in_flight`).
    """
    status, reason = publish_once(message)
    message.attempts += 1
    fields = outcome_fields(status, reason, attempts=message.attempts)
    db = connections[DEFAULT_DB_ALIAS]  # the connection itself: each `connection.x` looks it up again
    if (status == Message.Status.PUBLISHED and _postgresql_outside_a_transaction(db)
            and outcome_in_flight.applies(db)):
        outcome_in_flight.send(message, db, fields)
    else:
        record_outcome(message.pk, fields)
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def _postgresql_outside_a_transaction(db=None) -> bool:
    """Whether the outcome may be written in a transaction of its own (none of the caller's is open)."""
    db = connections[DEFAULT_DB_ALIAS] if db is None else db
    return db.vendor == "postgresql" and not db.in_atomic_block and db.get_autocommit()


def record_outcome(pk: int, fields: dict[str, Any]) -> None:
    """`attempts + 1` and the outcome's columns in one UPDATE.

    Plain SQL on the driver's own cursor: on this hot path the ORM's and the cursor wrapper's
    overhead is as large as the write itself.
    """
    connection.ensure_connection()
    sql = outcome_sql(tuple(fields), mark="?" if connection.vendor == "sqlite" else "%s")  # the driver's paramstyle
    own_transaction = _postgresql_outside_a_transaction()
    if own_transaction:
        # One round trip (client-side binding allows several statements), and a commit that does
        # not wait for the WAL flush: see `relaxed_commit`.
        sql = f"BEGIN; SET LOCAL synchronous_commit TO OFF; {sql}; COMMIT"
    cursor = connection.connection.cursor()
    try:
        with connection.wrap_database_errors:  # Django's exceptions, and its note that the connection erred
            cursor.execute(sql, [*outcome_params(connection, fields), pk])
    except DatabaseError:
        if own_transaction:  # a failed UPDATE skips the COMMIT: end the transaction it leaves open
            with contextlib.suppress(DatabaseError), connection.wrap_database_errors:
                connection.connection.rollback()
        raise
    finally:
        cursor.close()


def outcome_params(db, fields: dict[str, Any]) -> list[Any]:
    """The values of `fields` as the database connection `db` takes them, in order."""
    meta = Message._meta
    return [meta.get_field(name).get_db_prep_save(value, db) for name, value in fields.items()]


@contextlib.contextmanager
def relaxed_commit():
    """A transaction whose commit does not wait for PostgreSQL's WAL flush (publish outcomes, the relay's leases).

    Such a write is lost only if PostgreSQL itself crashes within a fraction of a second of the
    commit (the WAL writer flushes every `wal_writer_delay`, 200 ms by default); the letter is then
    still pending, the relay publishes it again and the consumer dedupes it by message_id: nothing
    is lost, and the web request does not pay an fsync on top of the broker's. The letter's own
    row is written in the caller's transaction, with the caller's durability. SQLite: a plain
    transaction (WAL with synchronous=NORMAL does not fsync at commit anyway).
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield


@functools.lru_cache(maxsize=64)
def outcome_sql(names: tuple[str, ...], *, mark: str = "%s", letters: int = 0) -> str:
    """The UPDATE of an outcome: `attempts + 1` and the columns `names`, each a `mark` parameter.

    Of the one letter whose pk follows the values (`letters` = 0), or of `letters` pks that follow
    them and then the pending status: the relay writes only over letters still pending.
    """
    meta, quote = Message._meta, connection.ops.quote_name
    attempts = quote(meta.get_field("attempts").column)
    sets = ", ".join(f"{quote(meta.get_field(name).column)} = {mark}" for name in names)
    sql = f"UPDATE {quote(meta.db_table)} SET {attempts} = {attempts} + 1, {sets} WHERE {quote(meta.pk.column)}"
    if not letters:
        return f"{sql} = {mark}"
    return f"{sql} IN ({', '.join([mark] * letters)}) AND {quote(meta.get_field('status').column)} = {mark}"


# --- routing preview (management API) -------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RoutePreview:
    """Where a letter would go, from the broker's bindings: the queues it reaches, or why none."""

    known: bool  # False when the management API is not configured or does not answer
    queues: tuple[str, ...] = ()
    note: str = ""

    @property
    def text(self) -> str:
        if not self.known:
            return self.note or "Routing preview unavailable (RABBITMQ_MANAGEMENT_URL is not set or does not answer)."
        if self.queues:
            return "reaches queues " + ", ".join(self.queues) + (f" ({self.note})" if self.note else "")
        return self.note or "no queue is bound: it would be returned"


def preview_route(*, exchange: str, routing_key: str, headers: dict[str, Any], declare: bool = False) -> RoutePreview:
    """Which queues a letter would reach now, computed from the management API's bindings."""
    from messaging import rabbitmq_api

    if not rabbitmq_api.configured():
        return RoutePreview(known=False)
    if not exchange:
        queues = rabbitmq_api.queues()
        if queues is None:
            return RoutePreview(known=False)
        if any(q.get("name") == routing_key for q in queues):
            return RoutePreview(known=True, queues=(routing_key,))
        if declare:
            return RoutePreview(known=True, queues=(routing_key,), note="the queue will be declared")
        return RoutePreview(known=True, note="no queue is bound: it would be returned (no such queue)")
    exchanges, bindings = rabbitmq_api.exchanges(), rabbitmq_api.bindings()
    if exchanges is None or bindings is None:
        return RoutePreview(known=False)
    types = {e.get("name"): e.get("type") for e in exchanges}
    if exchange not in types:
        if declare:
            return RoutePreview(known=True, note="the exchange will be declared; no queue is bound: it would be returned")
        return RoutePreview(known=True, note=f"no exchange named {exchange!r}: the letter would fail (404)")
    reached: set[str] = set()
    _route(exchange, routing_key, headers, types, bindings, reached, seen=set())
    return RoutePreview(known=True, queues=tuple(sorted(reached)))


def _route(exchange, routing_key, headers, types, bindings, reached, *, seen) -> None:
    if exchange in seen:
        return
    seen.add(exchange)
    kind = types.get(exchange, "direct")
    for binding in bindings:
        if binding.get("source") != exchange or not _matches(kind, binding, routing_key, headers):
            continue
        if binding.get("destination_type") == "queue":
            reached.add(binding.get("destination"))
        else:  # exchange-to-exchange binding
            _route(binding.get("destination"), routing_key, headers, types, bindings, reached, seen=seen)


def _matches(kind: str, binding: dict, routing_key: str, headers: dict[str, Any]) -> bool:
    key = binding.get("routing_key", "")
    if kind == "fanout":
        return True
    if kind == "topic":
        return topic_matches(key, routing_key)
    if kind == "headers":
        args = dict(binding.get("arguments") or {})
        mode = str(args.pop("x-match", "all"))
        with_x = mode.endswith("-with-x")
        wanted = {k: v for k, v in args.items() if with_x or not k.startswith("x-")}
        hits = [k in headers and headers[k] == v for k, v in wanted.items()]
        return any(hits) if mode.startswith("any") else all(hits)
    return key == routing_key  # direct (and x-* plugin types, approximately)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: '*' is exactly one word, '#' zero or more.

    One pass over the key per word of the pattern (the set of key positions reachable so far): a
    backtracking match took exponential time for a binding like `#.#.#.#.#.z` and a long key.
    """
    words = routing_key.split(".") if routing_key else []
    reachable = {0}  # how many words of the key the pattern's words so far can have consumed
    for p in pattern.split(".") if pattern else []:
        if p == "#":
            reachable = set(range(min(reachable), len(words) + 1))
        else:
            reachable = {i + 1 for i in reachable if i < len(words) and (p == "*" or p == words[i])}
        if not reachable:
            return False
    return len(words) in reachable
