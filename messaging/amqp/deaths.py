"""`x-death`: RabbitMQ's record of where and why a message was dead-lettered, read into fields.

RabbitMQ keeps one `x-death` entry per (queue, reason), most recent first, each with a `count`.
Headers are untrusted: a producer can write any shape there, so a malformed entry is skipped, never
an error. The entries come in three forms, all read here: as pika decodes them (a datetime `time`),
as the management API's JSON gives them (seconds since 1970), and as stored (`stored.to_json`).
"""

import datetime as dt
from dataclasses import dataclass

from .codec import text_value

REASONS = ("rejected", "expired", "maxlen", "delivery_limit")


@dataclass(frozen=True)
class Death:
    """One `x-death` entry: the queue a message died in, why, and how often."""

    queue: str
    reason: str
    exchange: str = ""
    routing_keys: tuple[str, ...] = ()
    count: int = 1
    time: dt.datetime | None = None

    def as_fields(self) -> dict:
        """The entry as `Delivery`'s death columns."""
        return {"dead_lettered_from": self.queue, "death_reason": self.reason, "death_exchange": self.exchange,
                "death_routing_keys": list(self.routing_keys), "death_count": self.count, "died_at": self.time}


def deaths(headers) -> list[Death]:
    """The well-formed `x-death` entries of `headers`, most recent first."""
    entries = headers.get("x-death") if isinstance(headers, dict) else None
    if not isinstance(entries, list):
        return []
    return [death for death in map(_death, entries) if death is not None]


def last_death(headers) -> Death | None:
    """The most recent `x-death` entry: the queue that dead-lettered this copy where it is now."""
    found = deaths(headers)
    return found[0] if found else None


def origin(headers, *, skip=()) -> Death | None:
    """The most recent entry whose queue is not in `skip` (say, Mailroom's own retry queues)."""
    return next((death for death in deaths(headers) if death.queue not in skip), None)


def _death(entry) -> Death | None:
    if not isinstance(entry, dict):
        return None
    queue, reason = _text(entry.get("queue")), _text(entry.get("reason"))
    if not queue or reason not in REASONS:
        return None
    keys = entry.get("routing-keys")
    count = entry.get("count", 1)
    return Death(
        queue=queue, reason=reason, exchange=_text(entry.get("exchange")) or "",
        routing_keys=tuple(_text(key) or "" for key in keys) if isinstance(keys, list) else (),
        count=count if type(count) is int and count >= 0 else 1, time=_time(entry.get("time")),
    )


def _text(value) -> str | None:
    """A name from a header, as a column stores it (at most 255 characters, NUL escaped)."""
    if value is None or isinstance(value, (dict, list)):
        return None
    return text_value(value)[:255]


def _time(value) -> dt.datetime | None:
    if isinstance(value, dict) and len(value) == 1 and "$timestamp" in value:  # stored.to_json's form
        value = value["$timestamp"]
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if type(value) is int and 0 <= value < 253402300800:  # the management API's seconds, up to the year 9999
        return dt.datetime.fromtimestamp(value, dt.UTC)
    return None
