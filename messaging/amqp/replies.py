"""Request/reply (RabbitMQ tutorial 6): publish a request on a channel of its own and wait for its reply.

The reply comes on direct reply-to (`amq.rabbitmq.reply-to`): no queue is declared, and the broker
routes the reply straight to this channel. RabbitMQ requires the channel to consume that
pseudo-queue, in no-ack mode, before it publishes with it as `reply_to`; a reply that comes once
the channel is closed is dropped by the broker.
"""
from __future__ import annotations

import logging
import time

from messaging.amqp.connection import translated
from messaging.amqp.publisher import Publisher
from messaging.amqp.subscription import Received

logger = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"  # the pseudo-queue; the broker rewrites it to a name of this channel's
POLL_SECONDS = 0.25  # the longest one wait on the socket lasts, so the deadline is kept to about this


class Requester(Publisher):
    """A short-lived confirmed channel that publishes one request and receives its reply (`wait`).

    Use it once and `close()` it: the reply consumer lives as long as its channel.
    """

    def __init__(self, *, timeout: float) -> None:
        super().__init__(timeout=timeout, client_name="mailroom-request")
        self._replies: list[Received] = []

    def _before_publish(self, channel) -> None:
        # Direct reply-to works in no-ack mode only: the reply is the broker's to drop, never to redeliver,
        # and is recorded (acked) by whoever waits for it.
        channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, channel, method, properties, body: bytes) -> None:
        self._replies.append(Received(
            queue=DIRECT_REPLY_TO, consumer_tag=method.consumer_tag, delivery_tag=method.delivery_tag,
            redelivered=method.redelivered, exchange=method.exchange, routing_key=method.routing_key,
            properties=properties, body=body,
        ))

    def wait(self, *, correlation_id: str, seconds: float) -> Received | None:
        """The reply whose correlation_id is `correlation_id`, or None when none came within `seconds`.

        Raises `ConnectionLost` when the connection is lost meanwhile. Other replies (a server's
        answer to no request of ours) are ignored, as the tutorial's client does.
        """
        deadline = time.monotonic() + seconds
        while True:
            for received in self._replies:
                if received.properties.correlation_id == correlation_id:
                    return received
            self._replies.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._connection is None:
                return None
            with translated():
                self._connection.process_data_events(time_limit=min(remaining, POLL_SECONDS))
