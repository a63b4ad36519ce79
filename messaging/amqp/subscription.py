"""A consumer's connection: declare and consume queues with manual acks; pika's errors come out as Mailroom's."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import pika.exceptions as pe

from messaging.amqp.connection import (
    PIKA_ERRORS,
    Nodes,
    QueueState,
    connect,
    declare_exchange,
    declare_queue,
    translated,
)
from messaging.amqp.retry_queues import retry_queue, ttl_ms
from messaging.errors import ChannelLost, NotAStream, QueueGone

logger = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class Received:
    """One delivery as it came off the channel, before it is recorded."""

    queue: str
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: Any  # pika.BasicProperties: read with `codec.read_properties`
    body: bytes
    received_at: float = field(default_factory=time.time)  # epoch seconds: cheaper to take than a datetime
    stream_offset: int | None = None  # its offset in the stream, when read from a stream (see `StreamStart`)


STREAM_OFFSET = "x-stream-offset"  # the consumer argument, and the header the broker sets on each delivery


@dataclass(frozen=True, kw_only=True)
class StreamStart:
    """Where to read a stream queue from (`x-stream-offset`), under which consumer tag."""

    offset: str | int | datetime  # 'first', 'last', 'next', an offset, or a time
    consumer_tag: str


def stream_offset(properties) -> int | None:
    """The offset the broker wrote in a stream delivery's headers (it replaces a producer's own)."""
    value = (properties.headers or {}).get(STREAM_OFFSET)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True, kw_only=True)
class Topology:
    """What to declare before consuming: the queues, their arguments, an exchange to bind them to."""

    queues: tuple[str, ...]  # an empty name: a server-named, exclusive queue
    durable: bool | None = None  # None: MAILROOM_DURABLE (see `declare_queue`)
    queue_type: str = ""
    dead_letter_exchange: str = ""
    dead_letter_queue: str = ""  # declared and bound to dead_letter_exchange (a fanout), which each queue then needs
    retry_delays: tuple[timedelta, ...] = ()  # one retry queue per delay and queue (`consumer.retries`)
    exchange: str = ""
    exchange_type: str = "direct"
    binding_keys: tuple[str, ...] = ()


class Subscription:
    """One connection and channel consuming `topology`'s queues; every method raises `ConnectionLost`
    (or `FatalBrokerError`) instead of pika's errors."""

    def __init__(self, *, heartbeat: int, client_name: str, logged_in_before: bool, nodes: Nodes | None = None) -> None:
        self._connection = connect(heartbeat=heartbeat, client_name=client_name, logged_in_before=logged_in_before,
                                   nodes=nodes)
        self._channel = None
        self._consumers = 0
        self._copies = None  # a channel with publisher confirms, opened for the first retry copy

    def declare(self, topology: Topology) -> list[QueueState]:
        """Declare the queues (an existing one is used as it is); return the state of each."""
        with translated():
            channel = self._connection.channel()
            states = []
            # A declaration that mismatches an existing queue closes the channel (406) and we go on
            # with another: so everything is declared first, then QoS set and consumed on the last.
            for name in topology.queues or ("",):
                channel, state = self._declare(channel, name, topology)
                states.append(state)
            self._channel = channel
        return states

    def _declare(self, channel, name: str, t: Topology):
        if t.dead_letter_exchange and not t.dead_letter_queue:
            channel = declare_exchange(self._connection, channel, t.dead_letter_exchange, exchange_type="fanout",
                                       durable=t.durable)
        channel, state = declare_queue(
            self._connection, channel, name, durable=t.durable, queue_type=t.queue_type,
            dead_letter_exchange=t.dead_letter_exchange, exclusive=not name, strict=bool(t.dead_letter_queue),
        )
        # The dead-letter queue and the retry queues last as long as the queue they serve, and are of its type.
        like = {"durable": state.survives_restart, "queue_type": state.queue_type}
        if t.dead_letter_queue:  # and the exchange feeding it
            channel = declare_exchange(self._connection, channel, t.dead_letter_exchange, exchange_type="fanout",
                                       durable=state.survives_restart)
            channel, _ = declare_queue(self._connection, channel, t.dead_letter_queue, **like)
            channel.queue_bind(queue=t.dead_letter_queue, exchange=t.dead_letter_exchange, routing_key="")
        for delay in t.retry_delays:
            channel, _ = declare_queue(
                self._connection, channel, retry_queue(state.name, delay), **like, message_ttl=ttl_ms(delay),
                dead_letter_routing_key=state.name, strict=True,
            )
        if t.dead_letter_queue or t.retry_delays:
            logger.info("queue=%s retry_queues=%s dead_letter_queue=%s", state.name,
                        ",".join(retry_queue(state.name, d) for d in t.retry_delays) or "-", t.dead_letter_queue or "-")
        if t.exchange:
            channel = declare_exchange(self._connection, channel, t.exchange, exchange_type=t.exchange_type,
                                       durable=t.durable)
            for key in t.binding_keys or ("",):
                channel.queue_bind(queue=state.name, exchange=t.exchange, routing_key=key)
        return channel, state

    def consume(self, queues: list[str], *, prefetch: int, on_delivery: Callable[[Received], None],
                streams: Mapping[str, StreamStart] = MappingProxyType({})) -> None:
        """Start consuming `queues` (as declared) with manual acks and `prefetch` unacked at most;
        those in `streams` are read as streams from where it says (their acks are only credit)."""

        def receiver(queue: str, *, stream: bool):
            def on_message(_channel, method, properties, body) -> None:
                on_delivery(Received(
                    queue=queue, consumer_tag=method.consumer_tag, delivery_tag=method.delivery_tag,
                    redelivered=method.redelivered, exchange=method.exchange, routing_key=method.routing_key,
                    properties=properties, body=body, stream_offset=stream_offset(properties) if stream else None,
                ))
            return on_message

        with translated():
            self._channel.basic_qos(prefetch_count=prefetch)
            for queue in queues:
                start = streams.get(queue)
                if start is None:
                    self._channel.basic_consume(queue=queue, on_message_callback=receiver(queue, stream=False))
                else:
                    self._consume_stream(queue, start, receiver(queue, stream=True))
            self._consumers = len(self._channel.consumer_tags)

    def _consume_stream(self, queue: str, start: StreamStart, on_message) -> None:
        try:
            self._channel.basic_consume(queue=queue, on_message_callback=on_message, consumer_tag=start.consumer_tag,
                                        arguments={STREAM_OFFSET: start.offset})
        except pe.ChannelClosedByBroker as exc:
            # RabbitMQ refuses a stream offset on another type of queue: "invalid arg 'x-stream-offset'".
            if exc.reply_code == 406 and STREAM_OFFSET in str(exc.reply_text):
                raise NotAStream(f"queue {queue!r} is not a stream ({exc.reply_text})") from None
            raise

    def process(self, seconds: float) -> None:
        """Service the connection for up to `seconds`: deliveries, heartbeats, and wake-ups (`wake`).

        Raises `ChannelLost` when the broker closed the channel (a delivery unacked past
        consumer_timeout) and `QueueGone` when it cancelled a consumer (its queue was deleted).
        """
        with translated():
            self._connection.process_data_events(time_limit=seconds)
        if self._channel is not None and self._consumers:
            if self._channel.is_closed:
                raise ChannelLost("the broker closed the channel (consumer_timeout?); opening another")
            if len(self._channel.consumer_tags) < self._consumers:
                raise QueueGone("the broker cancelled a consumer (queue deleted?); declaring it again")

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        with translated():
            self._channel.basic_ack(delivery_tag=delivery_tag, multiple=multiple)

    def nack(self, delivery_tag: int, *, requeue: bool) -> None:
        with translated():
            self._channel.basic_nack(delivery_tag=delivery_tag, requeue=requeue)

    def publish_copy(self, queue: str, *, body: bytes, properties) -> None:
        """Publish a copy to `queue` through the default exchange and wait for its confirm (`mandatory`:
        a missing queue raises `ConnectionLost`, and the worker declares it again on reconnecting)."""
        with translated():
            if self._copies is None or self._copies.is_closed:
                self._copies = self._connection.channel()
                self._copies.confirm_delivery()
            self._copies.basic_publish(exchange="", routing_key=queue, body=body, properties=properties, mandatory=True)

    def wake(self) -> None:
        """Make a `process` running in another thread return now (safe to call from any thread)."""
        try:
            self._connection.add_callback_threadsafe(lambda: None)
        except Exception:  # noqa: BLE001 — the connection is gone; `process` finds out by itself
            pass

    @property
    def consuming(self) -> bool:
        return self._consumers > 0

    def close(self) -> None:
        try:
            if self._connection.is_open:
                self._connection.close()
        except PIKA_ERRORS:
            pass
