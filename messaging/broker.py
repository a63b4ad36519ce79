"""The one module that talks to RabbitMQ through pika: connections, declarations, confirmed publishes.

Everything else in Mailroom calls these functions and catches the exceptions defined here, so the
rest of the code never imports pika.
"""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import logging
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions as pe
from django.conf import settings

logger = logging.getLogger(__name__)

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
MAX_SHORTSTR_BYTES = 255

# Errors that mean "the connection is gone, connect again".
CONNECTION_ERRORS = (pe.AMQPConnectionError, pe.ConnectionWrongStateError, pe.ChannelWrongStateError, OSError)
FATAL_REPLY_CODES = {403, 530}  # ACCESS_REFUSED, NOT_ALLOWED (e.g. missing vhost)


# --- exceptions the rest of Mailroom handles ------------------------------------------------
class BrokerError(Exception):
    """Publishing did not get a confirm; the letter stays pending and is retried."""


class BrokerBlocked(BrokerError):
    """The broker blocked the connection (memory or disk alarm)."""


class PublishRefused(Exception):
    """The broker refused this letter for good (no such exchange, too large, access refused)."""


class Unroutable(Exception):
    """The broker returned the letter: no queue is bound for its routing key."""


class FatalBrokerError(Exception):
    """Retrying cannot help: wrong credentials, missing vhost or permissions."""


# --- URLs and connection parameters ---------------------------------------------------------
def broker_urls(url: str | None = None) -> list[str]:
    """The comma-separated broker addresses of RABBITMQ_URL (a cluster), in order."""
    return [part.strip() for part in (url or settings.RABBITMQ_URL).split(",") if part.strip()]


def mask_url(url: str) -> str:
    """`url` with its password replaced by '***' (each address of a comma-separated list)."""
    masked = []
    for part in broker_urls(url) if url else []:
        split = urlsplit(part)
        if split.password is None:
            masked.append(part)
            continue
        host = split.hostname or ""
        if split.port:
            host = f"{host}:{split.port}"
        masked.append(urlunsplit(split._replace(netloc=f"{split.username}:***@{host}")))
    return ",".join(masked)


def connection_parameters(
    *, url: str | None = None, heartbeat: int | None = None, timeout: float | None = None,
    client_name: str = "mailroom",
) -> list[pika.URLParameters]:
    """pika parameters for every address in RABBITMQ_URL; `timeout` bounds connecting and blocking."""
    params = []
    for address in broker_urls(url):
        p = pika.URLParameters(address)
        if heartbeat is not None:
            p.heartbeat = heartbeat
        if timeout is not None:
            p.socket_timeout = timeout
            p.stack_timeout = timeout * 2
            p.blocked_connection_timeout = timeout
        p.client_properties = {"connection_name": client_name}
        params.append(p)
    return params


def connect(*, url: str | None = None, heartbeat: int | None = None, timeout: float | None = None,
            client_name: str = "mailroom") -> pika.BlockingConnection:
    """A blocking connection to the first broker of RABBITMQ_URL that answers."""
    try:
        return pika.BlockingConnection(
            connection_parameters(url=url, heartbeat=heartbeat, timeout=timeout, client_name=client_name)
        )
    except (pe.ProbableAuthenticationError, pe.ProbableAccessDeniedError, pe.AuthenticationError) as exc:
        raise FatalBrokerError(f"the broker refused the login ({exc.__class__.__name__}: {exc})") from exc
    except pe.ConnectionClosedByBroker as exc:
        if exc.reply_code in FATAL_REPLY_CODES:
            raise FatalBrokerError(f"the broker refused the connection: {exc.reply_code} {exc.reply_text}") from exc
        raise


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a pika error for logs and the database."""
    if isinstance(exc, (pe.ConnectionClosedByBroker, pe.ChannelClosedByBroker)):
        return f"{exc.__class__.__name__}: {exc.reply_code} {exc.reply_text}"
    if isinstance(exc, pe.ConnectionBlockedTimeout):
        return "broker blocked: the connection stayed blocked (memory or disk alarm)"
    if isinstance(exc, pe.AMQPConnectionError) and not str(exc):
        return f"{exc.__class__.__name__}: the broker did not answer"
    return f"{exc.__class__.__name__}: {exc}"


# --- declarations ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class QueueState:
    name: str
    message_count: int
    consumer_count: int
    note: str = ""


def declare_queue(
    connection: pika.BlockingConnection, channel, name: str, *, arguments: dict | None = None,
    exclusive: bool = False,
):
    """Declare a durable queue, or use an existing one as it is whatever its arguments.

    Returns `(channel, QueueState)`: a mismatch closes the channel (406), so the caller must go on
    with the channel returned here.
    """
    try:
        ok = channel.queue_declare(
            queue=name, durable=not exclusive, exclusive=exclusive, auto_delete=exclusive,
            arguments=arguments or None,
        )
        return channel, QueueState(
            name=ok.method.queue, message_count=ok.method.message_count, consumer_count=ok.method.consumer_count,
        )
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        note = exc.reply_text
    channel = connection.channel()
    ok = channel.queue_declare(queue=name, passive=True)
    kind = "quorum" if "'quorum'" in note else "stream" if "'stream'" in note else "classic"
    logger.info("queue=%s exists with other arguments; using it as it is (type=%s): %s", name, kind, note)
    return channel, QueueState(
        name=name, message_count=ok.method.message_count, consumer_count=ok.method.consumer_count, note=note,
    )


def declare_exchange(connection: pika.BlockingConnection, channel, name: str, *, exchange_type: str):
    """Declare a durable exchange, or use an existing one as it is. Returns the usable channel."""
    try:
        channel.exchange_declare(exchange=name, exchange_type=exchange_type, durable=True)
        return channel
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        logger.info("exchange=%s exists with other arguments; using it as it is: %s", name, exc.reply_text)
    channel = connection.channel()
    channel.exchange_declare(exchange=name, passive=True)
    return channel


def queue_state(name: str, *, timeout: float = 3.0) -> QueueState | None:
    """Ready and consumer counts of an existing queue by a passive declare; None if it does not exist."""
    connection = connect(timeout=timeout, client_name="mailroom-inspect")
    try:
        ok = connection.channel().queue_declare(queue=name, passive=True)
        return QueueState(name=name, message_count=ok.method.message_count, consumer_count=ok.method.consumer_count)
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    finally:
        if connection.is_open:
            connection.close()


# --- headers and properties -----------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """An AMQP table value as JSON (bytes as text or base64, datetimes ISO, decimals as strings).

    PostgreSQL refuses NUL in JSON text, so NUL characters are escaped as the text '\\u0000'.
    """
    if isinstance(value, dict):
        return {json_safe_str(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        try:
            return json_safe_str(value.decode("utf-8"))
        except UnicodeDecodeError:
            return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, str):
        return json_safe_str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return json_safe_str(repr(value))


def json_safe_str(text: str) -> str:
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


PROPERTY_NAMES = ("priority", "reply_to", "expiration", "timestamp", "type", "user_id", "app_id", "cluster_id")


def build_properties(message) -> pika.BasicProperties:
    """The AMQP properties of a `Message` row."""
    extra = {k: v for k, v in (message.properties or {}).items() if k in PROPERTY_NAMES and v not in (None, "")}
    return pika.BasicProperties(
        message_id=message.message_id,
        content_type=message.content_type or None,
        content_encoding=message.content_encoding or None,
        correlation_id=message.correlation_id or None,
        delivery_mode=message.delivery_mode or None,
        headers=message.headers or None,
        **extra,
    )


def read_properties(properties) -> dict[str, Any]:
    """Split received `BasicProperties` into `Message` fields (JSON-safe)."""
    extra = {}
    for name in PROPERTY_NAMES:
        value = getattr(properties, name, None)
        if value is not None:
            extra[name] = json_safe(value)
    return {
        "content_type": json_safe_str(properties.content_type or ""),
        "content_encoding": json_safe_str(properties.content_encoding or ""),
        "correlation_id": json_safe_str(properties.correlation_id or "")[:255],
        "delivery_mode": properties.delivery_mode or 1,
        "headers": json_safe(properties.headers or {}),
        "properties": extra,
    }


# --- publishing -----------------------------------------------------------------------------
class Publisher:
    """A long-lived confirmed channel; reconnects on the next publish after any failure.

    One per thread (see `publisher()`): a pika connection is not thread-safe.
    """

    def __init__(self, *, timeout: float, client_name: str = "mailroom-publisher") -> None:
        self.timeout = timeout
        self.client_name = client_name
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._declared: set[tuple[str, str]] = set()

    def _ensure_channel(self):
        if self._connection is None or not self._connection.is_open:
            self._declared.clear()
            self._connection = connect(timeout=self.timeout, client_name=self.client_name)
            self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def close(self) -> None:
        try:
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        except CONNECTION_ERRORS:
            pass
        self._connection = self._channel = None

    def publish(self, message, *, declare: bool = False) -> None:
        """Publish `message` with confirms and mandatory; raise `Unroutable`, `PublishRefused` or `BrokerError`."""
        try:
            channel = self._ensure_channel()
            if declare:
                channel = self._declare(channel, message)
            channel.basic_publish(
                exchange=message.exchange, routing_key=message.routing_key, body=bytes(message.body),
                properties=build_properties(message), mandatory=True,
            )
        except pe.UnroutableError as exc:
            returned = exc.messages[0].method if exc.messages else None
            reason = f"{returned.reply_code} {returned.reply_text}" if returned else "returned by the broker"
            raise Unroutable(reason) from exc
        except pe.NackError as exc:
            raise BrokerError("the broker nacked the letter (negative confirm)") from exc
        except pe.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code in (403, 404, 406):
                raise PublishRefused(describe(exc)) from exc
            raise BrokerError(describe(exc)) from exc
        except FatalBrokerError as exc:
            raise PublishRefused(str(exc)) from exc
        except pe.ConnectionBlockedTimeout as exc:
            self.close()
            raise BrokerBlocked(describe(exc)) from exc
        except (*CONNECTION_ERRORS, pe.AMQPError) as exc:
            self.close()
            raise BrokerError(describe(exc)) from exc

    def _declare(self, channel, message):
        key = (message.exchange, message.routing_key) if not message.exchange else (message.exchange, "")
        if key in self._declared:
            return channel
        if message.exchange:
            channel = declare_exchange(
                self._connection, channel, message.exchange, exchange_type=message.exchange_type or "direct",
            )
        else:
            channel, _ = declare_queue(self._connection, channel, message.routing_key)
        if channel is not self._channel:
            channel.confirm_delivery()
            self._channel = channel
        self._declared.add(key)
        return channel


_local = threading.local()


def publisher() -> Publisher:
    """This thread's long-lived `Publisher` (created on first use)."""
    current = getattr(_local, "publisher", None)
    if current is None:
        current = _local.publisher = Publisher(timeout=settings.MAILROOM_PUBLISH_TIMEOUT)
    return current
