"""Publishing one message at a time on a long-lived confirmed channel, one publisher per thread."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import pika
import pika.exceptions as pe

from messaging import conf
from messaging.amqp.codec import ENCODING_ERRORS, build_properties, check_frame_size
from messaging.amqp.connection import (
    CONNECTION_ERRORS,
    Nodes,
    connect,
    declare_exchange,
    declare_queue,
    describe,
    drop_after,
)
from messaging.errors import (
    BrokerBlocked,
    BrokerError,
    ConfirmTimeout,
    ConnectionLost,
    FatalBrokerError,
    FrameTooLarge,
    PublishRefused,
    Unroutable,
)

logger = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0  # an idle connection is checked before publishing on it (see Publisher._ensure_connection)


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
        # What this side proposes; RabbitMQ's default frame_max is the same, and it takes the smaller.
        self._frame_max = pika.ConnectionParameters.DEFAULT_FRAME_MAX
        self._logged_in = False  # this publisher has connected before (see `handshake_error`)
        self._nodes = Nodes()  # which broker node to connect to: spread, then the next after a loss

    def _ensure_connection(self) -> None:
        """Connect if need be (each address bounded by the socket and handshake timeouts)."""
        if self._connection is not None and self._connection.is_open and time.monotonic() > self._check_after:
            # The broker may have closed an idle connection (restart, heartbeat timeout): notice it
            # before publishing on it; right after a confirm the check is not worth its I/O, since a
            # publish on a connection lost that recently fails and leaves the message pending.
            try:
                self._connection.process_data_events(time_limit=0)
            except (*CONNECTION_ERRORS, pe.AMQPError) as exc:
                logger.info("publisher connection was lost while idle (%s); reconnecting", describe(exc))
                self.close()
        if self._connection is None or not self._connection.is_open:
            self._declared.clear()
            self._connection = connect(timeout=self.timeout, client_name=self.client_name,
                                       logged_in_before=self._logged_in, nodes=self._nodes)
            self._logged_in = True
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
        was deleted since — the exchange answers 404, or the message comes back from a queue that is
        gone — it is declared again and the message published once more (nothing was queued).
        """
        key = _declaration_key(message)
        declared_before = declare and key in self._declared
        try:
            self._publish(message, declare=declare)
        except (Unroutable, PublishRefused) as exc:
            if not (declared_before and _gone(exc, message)):
                raise
            logger.info("message_id=%s its destination was deleted since it was declared; declaring it again",
                        message.message_id, extra={"message_id": message.message_id})
            self._declared.discard(key)
            self._publish(message, declare=True)

    def _publish(self, message, *, declare: bool) -> None:
        with self._outcomes():
            try:
                self._ensure_connection()
                with self._deadline():
                    channel = self._ensure_channel()
                    properties = build_properties(message)
                    check_frame_size(properties, self._frame_max)
                    if declare:
                        channel = self._declare(channel, message)
                    self._before_publish(channel)
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

    def _before_publish(self, channel) -> None:
        """Called on the channel a message is about to be published on (a requester listens for its reply)."""

    @contextlib.contextmanager
    def _deadline(self):
        """Give up on the broker's answer (a channel, a declaration, a confirm) after `timeout` seconds.

        The wait then ends with `ConfirmTimeout` and the connection, whose answer may still come, is
        dropped (see `drop_after`). While the broker blocks the connection (an alarm), pika's
        blocked-connection timeout ends the wait instead.
        """
        cancel = drop_after(self._connection, self.timeout, ConfirmTimeout(f"no answer from the broker within {self.timeout:g}s"))
        try:
            yield
        except ConfirmTimeout:
            self.close()  # already dropped: forget it
            raise
        finally:
            cancel()

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
        except FatalBrokerError as exc:  # the login or vhost, not the message: it stays pending
            raise BrokerError(str(exc)) from exc
        except pe.ConnectionBlockedTimeout as exc:
            self.close()
            raise BrokerBlocked(describe(exc)) from exc
        except ConnectionLost as exc:
            self.close()
            raise BrokerError(str(exc)) from exc
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
            # otherwise close the pipelined channel, and with it every message of the window.
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
    """Whether `exc` says the message's declared destination no longer exists: no such exchange
    (404), or on the default exchange a message returned because its queue is gone."""
    if isinstance(exc, Unroutable):
        return not message.exchange
    return getattr(exc.__cause__, "reply_code", None) == 404


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
        current = _local.publisher = Publisher(timeout=conf.get("MAILROOM_PUBLISH_TIMEOUT"))
    return current
