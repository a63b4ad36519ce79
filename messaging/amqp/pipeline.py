"""Publishing a batch with confirms in flight (the relay's publisher), on a `SelectConnection`."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pika

from messaging.amqp.codec import ENCODING_ERRORS, check_frame_size
from messaging.amqp.connection import (
    CONNECTION_ERRORS,
    HANDSHAKE_ERRORS,
    Nodes,
    connection_parameters,
    describe,
    handshake_error,
)
from messaging.errors import BrokerError, FatalBrokerError, FrameTooLarge

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What the broker said about one message of a batch."""

    PUBLISHED = "published"
    UNROUTABLE = "unroutable"
    RETRY = "retry"
    REFUSED = "refused"  # the channel was closed with 403/404/406: publish it alone to learn which message

    status: str
    reason: str = ""


class PipelinedPublisher:
    """A long-lived `SelectConnection` that publishes a batch with confirms in flight (a window).

    Confirms arrive asynchronously; the ioloop runs only inside `send` and `collect`, in the calling
    thread. A message is `published` on ack, `unroutable` when the broker returned it before the ack,
    `retry` on nack, lost connection, timeout or blocked broker, and `refused` when the channel was
    closed by the broker (the caller then publishes those messages one by one to find the culprit).
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
        self._logged_in = False  # connected before (see `handshake_error`)
        self._nodes = Nodes()  # which broker node to connect to: spread, then the next after a loss

    # connection life cycle
    def _run(self, *, timeout: float) -> None:
        """Run the ioloop until a callback stops it or `timeout` passes."""
        ioloop = self._connection.ioloop
        timer = ioloop.call_later(timeout, ioloop.stop)
        ioloop.start()
        ioloop.remove_timeout(timer)

    def _connect(self) -> None:
        self._error = None
        errors = []
        addresses = connection_parameters(timeout=self.timeout, client_name=self.client_name)
        for index in self._nodes.order(len(addresses)):
            params = addresses[index]
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
                self._nodes.connected(index, addresses, client_name=self.client_name)
                self._logged_in = True
                self._next_tag = 1
                self._blocked = False
                return
            errors.append(self._error or TimeoutError("the broker did not open a channel in time"))
            self.close()
        exc = errors[-1]
        if isinstance(exc, HANDSHAKE_ERRORS):
            exc = handshake_error(exc, logged_in_before=self._logged_in)
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
    def send(self, messages: list) -> None:
        """Publish up to `window` messages without waiting for their confirms (`collect` waits).

        Each message has `message_id`, `exchange`, `routing_key`, `body` and `properties` (a ready
        `pika.BasicProperties`). The frames are flushed to the socket before this returns, so the
        broker works on them while the caller does something else (the relay claims the next batch).
        """
        if len(messages) > self.window:
            raise ValueError(f"at most {self.window} messages in flight")
        self._outcomes = [None] * len(messages)
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
                self._outcomes = [Outcome(status=Outcome.RETRY, reason=str(exc))] * len(messages)
                return
        channel = self._channel
        frame_max = self._connection.params.frame_max
        try:
            for index, message in enumerate(messages):
                self._by_message_id[message.message_id] = index
                try:
                    check_frame_size(message.properties, frame_max)
                    channel.basic_publish(
                        exchange=message.exchange, routing_key=message.routing_key, body=message.body,
                        properties=message.properties, mandatory=True,
                    )
                except ENCODING_ERRORS as exc:  # nothing was sent for this message
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
        """Wait (at most `timeout`) for the confirms of the messages of the last `send`."""
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
