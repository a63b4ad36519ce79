"""What `consume` is asked to do: the queues, how they are declared, and the worker's limits."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from messaging.amqp.subscription import Topology


@dataclass(frozen=True, kw_only=True)
class ConsumeOptions:
    queues: tuple[str, ...] = ()
    prefetch: int = 2000  # what bench/consume.py shows best on both databases, with batch_size 500
    batch_size: int = 500
    # Body bytes received and not yet acked, whatever the prefetch: the worker stops reading at this
    # (see `consumer.buffer`; docs/performance.md has how the default was chosen).
    max_unacked_bytes: int = 64 * 1024 * 1024
    max_messages: int | None = None
    inactivity_timeout: float | None = None
    handler: str = ""
    max_retries: int = 5
    # `--retry-delays`: a failed letter waits in a retry queue per delay, replacing max_retries (`retries`).
    retry_delays: tuple[timedelta, ...] = ()
    dead_letter_exchange: str = ""
    dead_letter_queue: str = ""  # declared, fed by dead_letter_exchange (by default an exchange of its name)
    exchange: str = ""
    exchange_type: str = "direct"
    binding_keys: tuple[str, ...] = ()
    # A missing queue (and exchange) is declared durable: None is MAILROOM_DURABLE (default False, as
    # the RabbitMQ tutorials declare theirs); a quorum queue is durable whatever this says.
    durable: bool | None = None
    queue_type: str = ""  # "stream": read the queues as streams (see `consumer.streams`)
    heartbeat: int = 30
    tap: str = ""  # a stream tap's name ("" is streams.DEFAULT_TAP)
    offset: str | int | datetime | None = None  # where a stream tap starts, whatever was stored

    def topology(self) -> Topology:
        """What to declare before consuming."""
        return Topology(
            queues=self.queues, durable=self.durable, queue_type=self.queue_type,
            dead_letter_exchange=self.dead_letter_exchange or self.dead_letter_queue,
            dead_letter_queue=self.dead_letter_queue, retry_delays=self.retry_delays, exchange=self.exchange,
            exchange_type=self.exchange_type, binding_keys=self.binding_keys,
        )
