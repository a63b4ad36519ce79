"""The one module that talks to RabbitMQ through pika: connections, declarations, confirmed publishes.

Everything else in Mailroom calls these functions and catches the exceptions defined here, so the
rest of the code never imports pika.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pe
from django.conf import settings

logger = logging.getLogger(__name__)

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
MAX_SHORTSTR_BYTES = 255

# Errors that mean "the connection is gone, connect again".
CONNECTION_ERRORS = (pe.AMQPConnectionError, pe.ConnectionWrongStateError, pe.ChannelWrongStateError, OSError)
IDLE_CHECK_SECONDS = 1.0  # see Publisher._ensure_connection
FATAL_REPLY_CODES = {403, 530}  # ACCESS_REFUSED, NOT_ALLOWED (e.g. missing vhost)


# --- exceptions the rest of Mailroom handles ------------------------------------------------
class BrokerError(Exception):
    """Publishing did not get a confirm; the letter stays pending and is retried."""


class BrokerBlocked(BrokerError):
    """The broker blocked the connection (memory or disk alarm)."""


class ConfirmTimeout(BrokerError):
    """No answer in time — a channel, a declaration, a confirm (a queue stuck, a quorum queue without
    its majority): the letter stays pending."""


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


HANDSHAKE_ERRORS = (pe.ProbableAuthenticationError, pe.ProbableAccessDeniedError, pe.AuthenticationError)
_logged_in = False  # this process has logged in to the broker before (see handshake_error)


def connect(*, url: str | None = None, heartbeat: int | None = None, timeout: float | None = None,
            client_name: str = "mailroom") -> pika.BlockingConnection:
    """A blocking connection to the first broker of RABBITMQ_URL that answers."""
    global _logged_in
    try:
        connection = pika.BlockingConnection(
            connection_parameters(url=url, heartbeat=heartbeat, timeout=timeout, client_name=client_name)
        )
    except HANDSHAKE_ERRORS as exc:
        raise handshake_error(exc) from exc
    except pe.ConnectionClosedByBroker as exc:
        if exc.reply_code in FATAL_REPLY_CODES:
            raise FatalBrokerError(f"the broker refused the connection: {exc.reply_code} {exc.reply_text}") from exc
        raise
    _logged_in = True
    return connection


def handshake_error(exc: Exception) -> Exception:
    """What a connection that failed during its handshake means: a refused login or vhost (fatal),
    or a broker that cut the handshake short (retry).

    pika calls any connection closed while authenticating a "probable" authentication error, and
    while tuning a "probable" access error. RabbitMQ refuses a login or vhost explicitly (403, 530);
    but it also drops connections still in their handshake when it stops or closes every
    connection, which pika reports the same way. Once this process has logged in, only an
    explicit refusal is fatal; before that, any such failure is (a misconfiguration is likelier
    than a broker restarting at that very moment, and retrying it would only storm).
    """
    text = str(exc)
    refused = isinstance(exc, pe.AuthenticationError) or any(f"({code})" in text for code in FATAL_REPLY_CODES)
    if refused or not _logged_in:
        return FatalBrokerError(f"the broker refused the login ({exc.__class__.__name__}: {text})")
    return pe.StreamLostError(f"the broker closed the connection during its handshake ({text})")


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


def queue_states(names, *, timeout: float = 3.0) -> dict[str, QueueState | None]:
    """Ready and consumer counts of queues by passive declares on one connection; None for a missing queue."""
    states: dict[str, QueueState | None] = {}
    connection = connect(timeout=timeout, client_name="mailroom-inspect")
    try:
        channel = connection.channel()
        for name in names:
            try:
                ok = channel.queue_declare(queue=name, passive=True)
                states[name] = QueueState(
                    name=name, message_count=ok.method.message_count, consumer_count=ok.method.consumer_count,
                )
            except pe.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                states[name] = None
                channel = connection.channel()  # a 404 closes the channel
    finally:
        if connection.is_open:
            connection.close()
    return states


# --- headers and properties -----------------------------------------------------------------
MAX_DECODED_DEPTH = 64  # header tables and arrays nested deeper than this are not decoded
_decoding = threading.local()


def _decode_value(encoded: bytes, offset: int, _pika_decode_value=pika.data.decode_value):
    """pika's `decode_value`, with AMQP floats and doubles decoded as floats, and a bounded depth.

    pika 1.4 casts floats to int (pika/pika#599): a header of 1.5 from another client (kombu, Java,
    Go) was recorded as 1. Nested tables and arrays come back through here: pika's decoders look
    the name up in their module. (NaN and the infinities never arrive: RabbitMQ closes the
    publisher's connection with an internal error instead.)

    Two headers pika cannot decode make it drop the connection — again at every redelivery, a
    poison letter no consumer gets past: a timestamp past the year 9999 (kept as its number of
    seconds here), and tables nested a thousand deep, which one frame holds easily and which exhaust
    Python's recursion (pika decodes them recursively). Below `MAX_DECODED_DEPTH` a table or array
    is skipped (its length is in front of it) and stands as a short text saying so.
    """
    kind = encoded[offset:offset + 1]
    if kind == b"d":
        return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
    if kind == b"f":
        return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
    if kind == b"T":  # seconds since 1970; beyond what a datetime holds (year 10000) pika raises and drops the connection
        seconds = struct.unpack_from(">Q", encoded, offset + 1)[0]
        try:
            return dt.datetime.fromtimestamp(seconds, dt.timezone.utc), offset + 9
        except (OverflowError, ValueError, OSError):
            return seconds, offset + 9
    if kind not in (b"F", b"A"):
        return _pika_decode_value(encoded, offset)
    depth = getattr(_decoding, "depth", 0)
    if depth >= MAX_DECODED_DEPTH:
        size = struct.unpack_from(">I", encoded, offset + 1)[0]
        return f"(not decoded: nested deeper than {MAX_DECODED_DEPTH} levels, {size} bytes)", offset + 5 + size
    _decoding.depth = depth + 1
    try:
        return _pika_decode_value(encoded, offset)
    finally:
        _decoding.depth = depth


pika.data.decode_value = _decode_value


def json_safe(value: Any) -> Any:
    """An AMQP table value as JSON (bytes as text or base64, datetimes ISO, decimals as strings).

    PostgreSQL refuses NUL in JSON text, so NUL characters are escaped as the text '\\u0000'.
    """
    kind = type(value)  # the common types first, by exact type: the consumer reads every header
    if kind is str:
        return json_safe_str(value)
    if kind in _JSON_SCALARS:
        return value
    if isinstance(value, dict):
        return {json_safe_str(k if type(k) is str else str(k)): json_safe(v) for k, v in value.items()}
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


_JSON_SCALARS = frozenset({int, bool, float, type(None)})


def json_safe_str(text: str) -> str:
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


def text_value(value) -> str:
    """A received short string (a property, the exchange, the routing key) as storable text.

    pika hands over bytes where another producer sent invalid UTF-8: those are decoded with
    U+FFFD for the invalid bytes, and NUL is escaped as in `json_safe_str`.
    """
    if type(value) is not str:
        value = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return json_safe_str(value)


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
        # pika cannot encode a float: fractions travel as AMQP decimals.
        headers=(_floats_to_decimals(message.headers) if _has_float(message.headers) else message.headers) or None,
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
        "content_type": text_value(properties.content_type or ""),
        "content_encoding": text_value(properties.content_encoding or ""),
        "correlation_id": text_value(properties.correlation_id or "")[:255],
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
        self._check_after = 0.0  # monotonic time after which an idle connection is checked first

    def _ensure_connection(self) -> None:
        """Connect if need be (each address bounded by the socket and handshake timeouts)."""
        if self._connection is not None and self._connection.is_open and time.monotonic() > self._check_after:
            # An idle connection may have been closed by the broker (restart, heartbeat timeout,
            # close_all_connections) since the last publish: notice it now, before publishing on it.
            # (Within IDLE_CHECK_SECONDS of a confirm the check is skipped: it costs as much as a
            # sixth of a publish, and a connection lost that recently fails the publish, which
            # leaves the letter pending for the relay, as a connection lost mid-publish does.)
            try:
                self._connection.process_data_events(time_limit=0)
            except (*CONNECTION_ERRORS, pe.AMQPError) as exc:
                logger.info("publisher connection was lost while idle (%s); reconnecting", describe(exc))
                self.close()
        if self._connection is None or not self._connection.is_open:
            self._declared.clear()
            self._connection = connect(timeout=self.timeout, client_name=self.client_name)
            self._channel = None

    def _ensure_channel(self):
        """This connection's confirmed channel (opened if need be; call under `_deadline`)."""
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
        """Publish `message` with confirms and mandatory; raise `Unroutable`, `PublishRefused` or `BrokerError`.

        With `declare`, a destination this publisher declared before is not declared again. If it
        was deleted since — the exchange answers 404, or the letter comes back from a queue that is
        gone — it is declared again and the letter published once more (nothing was queued).
        """
        key = _declaration_key(message)
        declared_before = declare and key in self._declared
        try:
            self._publish(message, declare=declare)
        except (Unroutable, PublishRefused) as exc:
            if not (declared_before and _gone(exc, message)):
                raise
            logger.info("message_id=%s its destination was deleted since it was declared; declaring it again",
                        message.message_id)
            self._declared.discard(key)
            self._publish(message, declare=True)

    def _publish(self, message, *, declare: bool) -> None:
        with self._outcomes():
            try:
                self._ensure_connection()
                with self._deadline():
                    channel = self._ensure_channel()
                    properties = build_properties(message)
                    check_frame_size(properties, self._connection._impl.params.frame_max)
                    if declare:
                        channel = self._declare(channel, message)
                    channel.basic_publish(
                        exchange=message.exchange, routing_key=message.routing_key, body=bytes(message.body),
                        properties=properties, mandatory=True,
                    )
                self._check_after = time.monotonic() + IDLE_CHECK_SECONDS
            except FrameTooLarge as exc:
                raise PublishRefused(f"the letter cannot be sent: {exc}") from exc
            except ENCODING_ERRORS as exc:
                raise PublishRefused(f"the letter cannot be encoded in AMQP: {exc.__class__.__name__}") from exc
            except pe.UnroutableError as exc:
                self._declared.clear()  # its queue may have been deleted since we declared it
                returned = exc.messages[0].method if exc.messages else None
                reason = f"{returned.reply_code} {returned.reply_text}" if returned else "returned by the broker"
                raise Unroutable(reason) from exc
            except pe.NackError as exc:
                raise BrokerError("the broker nacked the letter (negative confirm)") from exc

    @contextlib.contextmanager
    def _deadline(self):
        """Give up on the broker's answer (a channel, a declaration, a confirm) after `timeout` seconds.

        pika's blocking calls wait without a limit, and a broker that withholds an answer (a stuck
        queue process, a quorum queue without its majority) still answers heartbeats. pika 1.4's
        public timers fire only in `process_data_events`, so the deadline is a timer of the
        connection's own I/O loop that drops the connection the way pika's blocked-connection
        timeout does (no closing handshake, which a stuck broker may never answer): the wait ends
        with `ConfirmTimeout`, and the channel, whose answer may still come, is gone. While the
        broker blocks the connection (an alarm), pika's blocked timeout ends the wait instead.
        """
        impl = self._connection._impl

        def expire():
            if impl._blocked_conn_timer is None:
                impl._terminate_stream(ConfirmTimeout(f"no answer from the broker within {self.timeout:g}s"))

        timer = impl.ioloop.call_later(self.timeout, expire)
        try:
            yield
        except ConfirmTimeout:
            self.close()  # already dropped: forget it
            raise
        finally:
            impl.ioloop.remove_timeout(timer)

    @contextlib.contextmanager
    def _outcomes(self):
        """Turn pika's errors into Mailroom's: refused for good, blocked, or worth a retry."""
        try:
            yield
        except pe.ChannelClosedByBroker as exc:
            self._channel = None
            self._declared.clear()  # e.g. a 404: an exchange declared earlier was deleted since
            if exc.reply_code in (403, 404, 406):
                raise PublishRefused(describe(exc)) from exc
            raise BrokerError(describe(exc)) from exc
        except FatalBrokerError as exc:  # the login or vhost, not the letter: it stays pending
            raise BrokerError(str(exc)) from exc
        except pe.ConnectionBlockedTimeout as exc:
            self.close()
            raise BrokerBlocked(describe(exc)) from exc
        except (*CONNECTION_ERRORS, pe.AMQPError) as exc:
            self.close()
            raise BrokerError(describe(exc)) from exc

    def prepare(self, *, exchange: str, routing_key: str, declare: bool, exchange_type: str = "") -> None:
        """Make sure the destination exists (declare it, or a passive check of the exchange).

        Raises `PublishRefused` (404: no such exchange, 403) or `BrokerError`. The relay calls this
        once per destination of a batch, so one missing exchange never closes the pipelined channel.
        """
        destination = _Destination(exchange=exchange, routing_key=routing_key, exchange_type=exchange_type)
        if declare and exchange:
            # Declared again for each batch (one quick round trip): an exchange deleted since would
            # otherwise close the pipelined channel, and with it every letter of the window.
            self._declared.discard(_declaration_key(destination))
        with self._outcomes():
            self._ensure_connection()
            with self._deadline():
                channel = self._ensure_channel()
                if declare:
                    self._declare(channel, destination)
                elif exchange:
                    channel.exchange_declare(exchange=exchange, passive=True)

    def _declare(self, channel, message):
        key = _declaration_key(message)
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


def _declaration_key(message) -> tuple[str, str]:
    """What a declaration covers: the exchange, or on the default exchange the queue."""
    return (message.exchange, "") if message.exchange else ("", message.routing_key)


def _gone(exc: Exception, message) -> bool:
    """Whether `exc` says the letter's declared destination no longer exists: no such exchange
    (404), or on the default exchange a letter returned because its queue is gone."""
    if isinstance(exc, Unroutable):
        return not message.exchange
    return getattr(exc.__cause__, "reply_code", None) == 404


# What pika raises when a header value cannot be written as an AMQP field.
ENCODING_ERRORS = (
    pe.UnsupportedAMQPFieldException, pe.ShortStringTooLong, struct.error, OverflowError, TypeError, ValueError,
)


def header_encoding_error(headers: dict) -> str:
    """Why `headers` cannot be sent as an AMQP table ('' when they can)."""
    try:
        size = pika.data.encode_table([], _floats_to_decimals(headers))
    except ENCODING_ERRORS as exc:
        return f"headers cannot be encoded in AMQP ({exc.__class__.__name__}); numbers must fit 64 bits, " \
               "decimals at most 255 places"
    if size > MAX_HEADERS_BYTES:
        return f"headers take {size:,} bytes once encoded; at most {MAX_HEADERS_BYTES:,} fit in the AMQP frame " \
               "that carries them with the other properties"
    return ""


# The properties travel in one frame, which the broker refuses past its frame_max (131,072 bytes by
# default) by closing the connection (501 frame_too_large): every letter in flight on it is lost
# with it, and the letter itself would be sent again and again. The properties other than headers
# are short strings and numbers: ~4 kB at most.
OTHER_PROPERTIES_MAX_BYTES = 4096
MAX_HEADERS_BYTES = pika.spec.FRAME_MAX_SIZE - OTHER_PROPERTIES_MAX_BYTES


class FrameTooLarge(ValueError):
    """A letter whose properties do not fit in one AMQP frame (see `check_frame_size`)."""


def check_frame_size(properties: pika.BasicProperties, frame_max: int) -> None:
    """Raise `FrameTooLarge` when `properties` would not fit in a frame of `frame_max` bytes.

    Letters written since this check reach the broker within the limit (`header_encoding_error`);
    this catches older rows and copies of received letters whose headers grew as JSON. Headers
    under the margin are taken as they are: encoding their table costs ~2 µs, the whole frame ~6.
    """
    headers = properties.headers
    if not headers or pika.data.encode_table([], headers) + OTHER_PROPERTIES_MAX_BYTES <= frame_max:
        return
    size = len(pika.frame.Header(1, 0, properties).marshal())
    if size > frame_max:
        raise FrameTooLarge(f"its properties take {size:,} bytes in their AMQP frame; the broker takes at most "
                            f"{frame_max:,} (frame_max)")


def _has_float(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def _floats_to_decimals(value):
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _floats_to_decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_to_decimals(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class _Destination:
    exchange: str
    routing_key: str
    exchange_type: str = ""


_local = threading.local()


def publisher() -> Publisher:
    """This thread's long-lived `Publisher` (created on first use)."""
    current = getattr(_local, "publisher", None)
    if current is None:
        current = _local.publisher = Publisher(timeout=settings.MAILROOM_PUBLISH_TIMEOUT)
    return current


# --- pipelined confirms (the relay) ---------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What the broker said about one letter of a batch."""

    PUBLISHED = "published"
    UNROUTABLE = "unroutable"
    RETRY = "retry"
    REFUSED = "refused"  # the channel was closed with 403/404/406: publish it alone to learn which letter

    status: str
    reason: str = ""


class PipelinedPublisher:
    """A long-lived `SelectConnection` that publishes a batch with confirms in flight (a window).

    Confirms arrive asynchronously; the ioloop runs only inside `publish_batch`, in the calling
    thread. A letter is `published` on ack, `unroutable` when the broker returned it before the ack,
    `retry` on nack, lost connection, timeout or blocked broker, and `refused` when the channel was
    closed by the broker (the caller then publishes those letters one by one to find the culprit).
    """

    def __init__(self, *, timeout: float, window: int = 1000, client_name: str = "mailroom-relay") -> None:
        self.timeout = timeout
        self.window = window
        self.client_name = client_name
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._next_tag = 1
        self._pending: dict[int, int] = {}       # delivery tag -> index in the batch
        self._by_message_id: dict[str, int] = {}
        self._returned: dict[int, str] = {}
        self._outcomes: list[Outcome | None] = []
        self._error: BaseException | None = None
        self._blocked = False

    # connection life cycle
    def _run(self, *, timeout: float) -> None:
        """Run the ioloop until a callback stops it or `timeout` passes."""
        ioloop = self._connection.ioloop
        timer = ioloop.call_later(timeout, ioloop.stop)
        ioloop.start()
        ioloop.remove_timeout(timer)

    def _connect(self) -> None:
        global _logged_in
        self._error = None
        errors = []
        for params in connection_parameters(timeout=self.timeout, client_name=self.client_name):
            ready = {"ok": False}

            def on_open(connection, ready=ready):
                connection.channel(on_open_callback=on_channel)

            def on_channel(channel, ready=ready):
                self._channel = channel
                channel.add_on_return_callback(self._on_return)
                channel.add_on_close_callback(self._on_channel_closed)
                channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_select)

            def on_select(frame, ready=ready):
                ready["ok"] = True
                self._connection.ioloop.stop()

            def on_open_error(connection, exc):
                self._error = exc
                connection.ioloop.stop()

            self._connection = pika.SelectConnection(
                params, on_open_callback=on_open, on_open_error_callback=on_open_error,
                on_close_callback=self._on_connection_closed,
            )
            self._connection.add_on_connection_blocked_callback(self._on_blocked)
            self._connection.add_on_connection_unblocked_callback(self._on_unblocked)
            self._run(timeout=self.timeout * 2)
            if ready["ok"]:
                _logged_in = True
                self._next_tag = 1
                self._blocked = False
                return
            errors.append(self._error or TimeoutError("the broker did not open a channel in time"))
            self.close()
        exc = errors[-1]
        if isinstance(exc, HANDSHAKE_ERRORS):
            exc = handshake_error(exc)
            if isinstance(exc, FatalBrokerError):
                raise exc from errors[-1]
        raise BrokerError(describe(exc)) from exc

    @property
    def is_open(self) -> bool:
        return (self._connection is not None and self._connection.is_open
                and self._channel is not None and self._channel.is_open)

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is None:
            return
        try:
            if connection.is_open:
                connection.close()
                timer = connection.ioloop.call_later(self.timeout, connection.ioloop.stop)
                connection.ioloop.start()  # until on_close stops it
                connection.ioloop.remove_timeout(timer)
        except CONNECTION_ERRORS:
            pass
        finally:
            try:
                connection.ioloop.close()
            except Exception:  # noqa: BLE001 — closing a dead loop
                pass

    # callbacks (all run inside the ioloop)
    def _on_confirm(self, frame) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            index = self._pending.pop(tag, None)
            if index is None:
                continue
            if not acked:
                self._outcomes[index] = Outcome(status=Outcome.RETRY, reason="the broker nacked the letter (negative confirm)")
            elif index in self._returned:
                self._outcomes[index] = Outcome(status=Outcome.UNROUTABLE, reason=self._returned[index])
            else:
                self._outcomes[index] = Outcome(status=Outcome.PUBLISHED)
        if not self._pending:
            self._connection.ioloop.stop()

    def _on_return(self, channel, method, properties, body) -> None:
        index = self._by_message_id.get(properties.message_id)
        if index is not None:
            self._returned[index] = f"{method.reply_code} {method.reply_text}"

    def _on_blocked(self, connection, frame) -> None:
        self._blocked = True
        logger.warning("relay connection blocked by the broker (memory or disk alarm)")

    def _on_unblocked(self, connection, frame) -> None:
        self._blocked = False

    def _fail_pending(self, outcome: Outcome) -> None:
        for index in self._pending.values():
            self._outcomes[index] = outcome
        self._pending.clear()

    def _on_channel_closed(self, channel, reason) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        code = getattr(reason, "reply_code", 0)
        status = Outcome.REFUSED if code in (403, 404, 406) else Outcome.RETRY
        self._fail_pending(Outcome(status=status, reason=describe(reason)))
        if self._connection is not None:
            self._connection.ioloop.stop()

    def _on_connection_closed(self, connection, reason) -> None:
        self._channel = None
        text = describe(reason)
        if self._blocked and not text.startswith("broker blocked"):
            text = f"broker blocked: {text}"
        self._fail_pending(Outcome(status=Outcome.RETRY, reason=text))
        self._error = reason
        connection.ioloop.stop()

    # publishing
    def publish_batch(self, letters: list) -> list[Outcome]:
        """Publish `letters` and wait for every confirm; one `Outcome` per letter, in order."""
        outcomes: list[Outcome] = []
        for start in range(0, len(letters), self.window):
            self.send(letters[start:start + self.window])
            outcomes.extend(self.collect())
        return outcomes

    def send(self, letters: list) -> None:
        """Publish up to `window` letters without waiting for their confirms (`collect` waits).

        Each letter has `message_id`, `exchange`, `routing_key`, `body` and `properties` (a ready
        `pika.BasicProperties`). The frames are flushed to the socket before this returns, so the
        broker works on them while the caller does something else (the relay claims the next batch).
        """
        if len(letters) > self.window:
            raise ValueError(f"at most {self.window} letters in flight")
        self._outcomes = [None] * len(letters)
        self._pending = {}
        self._returned = {}
        self._by_message_id = {}
        if self.is_open:
            # The ioloop runs only while publishing: a connection idle for a while sent no heartbeats
            # and may have been dropped by the broker. One pass notices a close before we publish.
            self._run(timeout=0)
        if not self.is_open:
            self.close()
            try:
                self._connect()
            except BrokerError as exc:  # a FatalBrokerError (login, vhost) goes to the caller: retrying cannot help
                self._outcomes = [Outcome(status=Outcome.RETRY, reason=str(exc))] * len(letters)
                return
        channel = self._channel
        frame_max = self._connection.params.frame_max
        try:
            for index, letter in enumerate(letters):
                self._by_message_id[letter.message_id] = index
                try:
                    check_frame_size(letter.properties, frame_max)
                    channel.basic_publish(
                        exchange=letter.exchange, routing_key=letter.routing_key, body=letter.body,
                        properties=letter.properties, mandatory=True,
                    )
                except ENCODING_ERRORS as exc:  # nothing was sent for this letter
                    reason = str(exc) if isinstance(exc, FrameTooLarge) else exc.__class__.__name__
                    self._outcomes[index] = Outcome(status=Outcome.REFUSED, reason=reason)
                    continue
                self._pending[self._next_tag] = index
                self._next_tag += 1
        except CONNECTION_ERRORS as exc:
            self._fail_pending(Outcome(status=Outcome.RETRY, reason=describe(exc)))
        if self._pending:
            self._run(timeout=0)  # one pass of the ioloop writes the frames out

    def collect(self) -> list[Outcome]:
        """Wait (at most `timeout`) for the confirms of the letters of the last `send`."""
        if self._pending:
            self._run(timeout=self.timeout)
        if self._pending:  # no confirm in time: the state of the channel is unknown, start afresh
            reason = "broker blocked: no confirm while the connection is blocked" if self._blocked else (
                f"no confirm within {self.timeout:g}s")
            self._fail_pending(Outcome(status=Outcome.RETRY, reason=reason))
            self.close()
        missing = Outcome(status=Outcome.RETRY, reason="not published (the channel closed first)")
        outcomes = [outcome or missing for outcome in self._outcomes]
        self._outcomes = []
        return outcomes
