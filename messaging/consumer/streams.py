"""Stream taps: read a stream queue from an offset, taking nothing from its other readers, and keep
the offset reached in the same transaction as the batch's rows.

A stream (`x-queue-type: stream`, RabbitMQ ≥ 3.9) is a log: any number of consumers read it, each
from an offset of its own, and an ack only gives the consumer credit for more. A tap is one named
reader (`consume S --queue-type stream --tap NAME`). Its batches are recorded one at a time, in
order, and each commit writes the offset of the batch's last message (`StreamOffset`) with the
batch's `Message` and `Delivery` rows, or neither. So a tap that restarts, even after kill -9,
resumes at the message after the last one recorded: nothing skipped, nothing recorded twice.

Where a tap starts reading, first that applies: where this process got to (after a reconnect);
`--offset` (first, last, next, an offset, an ISO 8601 time); the stored offset plus one; else
`next`, as RabbitMQ does (only what arrives from now on). Two processes must not share a tap's name.
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime

from django.db import Error as DatabaseError
from django.utils import timezone

from messaging.amqp.subscription import Received, StreamStart
from messaging.consumer.options import ConsumeOptions
from messaging.errors import ConnectionLost
from messaging.models import StreamOffset

logger = logging.getLogger(__name__)

STREAM = "stream"  # the x-queue-type of a stream queue
DEFAULT_TAP = "default"  # the tap's name when `--tap` is not given
DEFAULT_OFFSET = "next"  # a tap with nothing stored and no `--offset`: RabbitMQ's own default
NAMED_OFFSETS = ("first", "last", "next")


def parse_offset(text: str) -> str | int | datetime:
    """`--offset`: first, last, next, an offset (an integer, 0 or more) or an ISO 8601 time (UTC if naive)."""
    value = text.strip()
    if value.lower() in NAMED_OFFSETS:
        return value.lower()
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not first, last, next, an offset (0 or more) or an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def tap_for(options: ConsumeOptions) -> Tap | None:
    """The tap of a worker that reads its queues as streams (`--queue-type stream`), else None."""
    if options.queue_type != STREAM:
        return None
    return Tap(streams=options.queues, name=options.tap or DEFAULT_TAP, offset=options.offset)


class Tap:
    """One named reader of stream queues: where it starts, and the offsets it has recorded."""

    def __init__(self, *, streams: tuple[str, ...], name: str = DEFAULT_TAP,
                 offset: str | int | datetime | None = None) -> None:
        self.streams = streams
        self.name = name
        self.offset = offset  # `--offset`: where this process starts, whatever was stored
        self.reached: dict[str, int] = {}  # the offsets this process committed, by stream

    def starts(self) -> dict[str, StreamStart]:
        """Where to read each stream from now. Reads the stored offsets: call it on a database thread."""
        stored: dict[str, int] = {}
        if self.offset is None and any(s not in self.reached for s in self.streams):
            try:
                stored = dict(StreamOffset.objects.filter(stream__in=self.streams, tap=self.name)
                              .values_list("stream", "offset"))
            except DatabaseError as exc:
                # Retried as a lost connection is: with backoff, nothing consumed meanwhile.
                raise ConnectionLost(f"database unavailable: cannot read where tap {self.name!r} stopped "
                                     f"({exc.__class__.__name__})") from exc
        starts = {}
        for stream in self.streams:
            if stream in self.reached:
                offset, why = self.reached[stream] + 1, "after the last message this process recorded"
            elif self.offset is not None:
                offset, why = self.offset, "as --offset says"
            elif stream in stored:
                offset, why = stored[stream] + 1, "after the last message recorded"
            else:
                offset, why = DEFAULT_OFFSET, "nothing recorded yet"
            logger.info("stream=%s tap=%s offset=%s (%s)", stream, self.name, offset, why)
            starts[stream] = StreamStart(offset=offset, consumer_tag=self.consumer_tag(stream))
        return starts

    def consumer_tag(self, stream: str) -> str:
        """The consumer tag the tap reads `stream` under (unique on a channel; at most 255 bytes)."""
        return f"tap:{self.name}:{stream}".encode()[:255].decode(errors="ignore")

    def save(self, batch: list[Received]) -> dict[str, int]:
        """Write the offset of each stream's last message in `batch`, inside the batch's transaction."""
        reached: dict[str, int] = {}
        for r in batch:
            if r.stream_offset is not None:
                reached[r.queue] = r.stream_offset  # in order: the last is the furthest
        if reached:
            now = timezone.now()
            StreamOffset.objects.bulk_create(
                [StreamOffset(stream=stream, tap=self.name, offset=offset, updated_at=now)
                 for stream, offset in reached.items()],
                update_conflicts=True, unique_fields=["stream", "tap"], update_fields=["offset", "updated_at"],
            )
        return reached

    def committed(self, reached: dict[str, int]) -> None:
        """The transaction that saved `reached` committed (called on the recording thread)."""
        self.reached.update(reached)
