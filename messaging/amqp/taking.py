"""Taking messages one at a time from a queue with `basic.get`, acked or put back on purpose (replay).

A copy taken stays unacked until the caller acks it or puts it back: if the process dies, the broker
requeues it (marked redelivered). Copies put back are put back together at the end (`put_back`), so
that the same copy is never taken twice in one run: `basic.get` would hand a requeued copy out again
at once, from the head of the queue.
"""
from __future__ import annotations

import contextlib
from typing import Self

import pika.exceptions as pe

from messaging.amqp.connection import PIKA_ERRORS, connect, drop_after, translated
from messaging.amqp.subscription import Received
from messaging.errors import ConnectionLost, NoSuchQueue


class Taker:
    """One connection and channel taking from `queue`; raises `NoSuchQueue`, `ConnectionLost` or
    `FatalBrokerError`, never pika's errors. Use as a context manager: closing it puts back every
    copy not acked (the broker requeues them)."""

    def __init__(self, queue: str, *, timeout: float, client_name: str = "mailroom-replay") -> None:
        self.queue = queue
        self.timeout = timeout
        self._connection = connect(timeout=timeout, client_name=client_name)
        try:
            with self._answered():
                self._channel = self._connection.channel()
                try:
                    self._channel.queue_declare(queue=queue, passive=True)
                except pe.ChannelClosedByBroker as exc:
                    if exc.reply_code == 404:
                        raise NoSuchQueue(f"there is no queue {queue!r} on the broker (404 NOT_FOUND)") from None
                    raise
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def take(self) -> Received | None:
        """The copy at the head of the queue, unacked; None when the queue is empty."""
        with self._answered():
            method, properties, body = self._channel.basic_get(queue=self.queue, auto_ack=False)
        if method is None:
            return None
        return Received(queue=self.queue, consumer_tag="", delivery_tag=method.delivery_tag,
                        redelivered=method.redelivered, exchange=method.exchange, routing_key=method.routing_key,
                        properties=properties, body=body)

    def ack(self, delivery_tag: int) -> None:
        """Remove a copy taken from the queue."""
        with self._answered():
            self._channel.basic_ack(delivery_tag=delivery_tag)

    def put_back(self, delivery_tags: list[int]) -> None:
        """Requeue copies taken and not acked (they return marked redelivered, in their places)."""
        with self._answered():
            for tag in delivery_tags:
                self._channel.basic_nack(delivery_tag=tag, requeue=True)

    def sleep(self, seconds: float) -> None:
        """Wait while the connection keeps answering the broker's heartbeats."""
        with translated():
            self._connection.sleep(seconds)

    @contextlib.contextmanager
    def _answered(self):
        """pika's errors translated, and the connection dropped when the broker does not answer within
        `timeout` (a stuck queue still answers heartbeats): a web request never waits on it for long."""
        cancel = drop_after(self._connection, self.timeout,
                            ConnectionLost(f"no answer from the broker within {self.timeout:g}s"))
        try:
            with translated():
                yield
        finally:
            cancel()

    def close(self) -> None:
        try:
            if self._connection.is_open:
                self._connection.close()
        except PIKA_ERRORS:
            pass  # gone already: the broker requeues whatever was not acked
