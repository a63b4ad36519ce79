"""Dead-letter queues: which queues they are, what is in them, grouped by original queue and reason,
each message with its trail of deliveries from the history. The pages, the API and the admin read this.

A dead-letter queue is one bound to an exchange that some queue names as its dead-letter exchange
(`x-dead-letter-exchange`, or a policy's `dead-letter-exchange`). The default exchange "" is not
one: Mailroom's retry queues name it to send expired messages back to their queue.
What is in one is read with a peek (messaging.amqp.peeking), which puts every message back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import F, Window
from django.db.models.functions import RowNumber

from messaging.amqp import management, peeking
from messaging.amqp.deaths import REASONS, Death
from messaging.amqp.peeking import Peeked
from messaging.errors import ManagementUnavailable
from messaging.models import Delivery, Message

DEFAULT_COUNT = peeking.MAX_PEEK  # messages read from a dead-letter queue unless fewer are asked for
TRAIL_STEPS = 20  # the latest deliveries shown per message
NO_DEATH = "-"  # the filter value of messages without x-death (published to the queue directly)
QUEUE_COLUMNS = "name,type,arguments,effective_policy_definition,messages_ready,messages_unacknowledged,consumers"


@dataclass(frozen=True, kw_only=True)
class DeadLetterQueue:
    """A queue that receives dead letters: its depth, the exchanges it is bound to and who dead-letters there."""

    name: str
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    kind: str = ""
    exchanges: tuple[str, ...] = ()  # the dead-letter exchanges it is bound to
    sources: tuple[str, ...] = ()  # the queues naming those exchanges as their dead-letter exchange

    @property
    def messages(self) -> int:
        return (self.ready or 0) + (self.unacked or 0)


@dataclass(frozen=True, kw_only=True)
class Step:
    """One delivery of a message's trail: where, when, how it was settled, and its error's last line."""

    queue: str
    received_at: datetime
    status: str
    attempt: int
    retry_delay: timedelta | None
    error: str  # the last line of the error ('' when none)
    death_reason: str
    dead_lettered_from: str


@dataclass(kw_only=True)
class DeadLetter:
    """A message read from a dead-letter queue, with its letter and trail when the history has them."""

    copy: Peeked
    message: Message | None = None
    trail: list[Step] = field(default_factory=list)

    @property
    def death(self) -> Death | None:
        return self.copy.deaths[0] if self.copy.deaths else None


@dataclass(frozen=True, kw_only=True)
class Group:
    """The dead letters of one original queue that died there for one reason."""

    original_queue: str  # '' when the messages have no x-death
    reason: str
    letters: list[DeadLetter]


@dataclass(frozen=True, kw_only=True)
class Contents:
    """What a read of a dead-letter queue found: the groups (after the filters) and how much was read."""

    queue: str
    depth: int | None
    read: int  # messages read from the head of the queue
    groups: list[Group]
    originals: list[str]  # the original queues seen, for the filter's choices
    reasons: list[str]


def dead_letter_exchanges(queues: list[dict]) -> dict[str, set[str]]:
    """Each dead-letter exchange (not the default exchange) named by `queues`, with the queues naming it."""
    found: dict[str, set[str]] = {}
    for q in queues:
        arguments = q.get("arguments") if isinstance(q.get("arguments"), dict) else {}
        policy = q.get("effective_policy_definition") if isinstance(q.get("effective_policy_definition"), dict) else {}
        exchange = arguments.get("x-dead-letter-exchange", policy.get("dead-letter-exchange"))
        if isinstance(exchange, str) and exchange:
            found.setdefault(exchange, set()).add(str(q.get("name", "")))
    return found


def dead_letter_queues() -> list[DeadLetterQueue]:
    """The dead-letter queues of the vhost, by name. Raises `ManagementUnavailable`."""
    # Only the columns read here: a broker's full listing carries every queue's rates and stats.
    queues = management.call(f"queues/{management.vhost()}?columns={QUEUE_COLUMNS}")
    bindings = management.call(f"bindings/{management.vhost()}?columns=source,destination,destination_type")
    if not isinstance(queues, list) or not isinstance(bindings, list):
        raise ManagementUnavailable("The RabbitMQ management API did not list the queues.")
    exchanges = dead_letter_exchanges(queues)
    bound: dict[str, set[str]] = {}
    for b in bindings:
        if b.get("destination_type") == "queue" and b.get("source") in exchanges:
            bound.setdefault(str(b.get("destination", "")), set()).add(b["source"])
    by_name = {q.get("name"): q for q in queues}
    rows = []
    for name in sorted(bound):
        q = by_name.get(name, {})
        rows.append(DeadLetterQueue(
            name=name, ready=q.get("messages_ready"), unacked=q.get("messages_unacknowledged"),
            consumers=q.get("consumers"), kind=q.get("type", ""), exchanges=tuple(sorted(bound[name])),
            sources=tuple(sorted(set().union(*(exchanges[e] for e in bound[name])))),
        ))
    return rows


def contents(queue: str, *, count: int = DEFAULT_COUNT, original: str | None = None,
             reason: str | None = None) -> Contents | None:
    """The messages at the head of `queue` (put back at once), grouped by original queue and reason, with
    their trails; `original` and `reason` (NO_DEATH: none) narrow the groups. None when there is no such
    queue; raises `ManagementUnavailable`, or `ManagementRefused` (a stream queue)."""
    details = management.queue(queue)
    copies = peeking.peek(queue, count=count) if details is not None else None
    if copies is None:
        return None
    letters = [DeadLetter(copy=c) for c in copies]
    join_history(letters)
    groups: dict[tuple[str, str], list[DeadLetter]] = {}
    for letter in letters:
        death = letter.death
        groups.setdefault((death.queue, death.reason) if death else ("", ""), []).append(letter)
    keys = sorted(groups)
    chosen = [k for k in keys if (original is None or k[0] == (original if original != NO_DEATH else ""))
              and (reason is None or k[1] == (reason if reason != NO_DEATH else ""))]
    # The broker's own count when it took the head, exact; the API's figures lag by a few seconds.
    ready = copies[0].remaining + 1 if copies and copies[0].remaining is not None else details.get("messages_ready")
    depth = (ready or 0) + (details.get("messages_unacknowledged") or 0)
    return Contents(
        queue=queue, depth=depth, read=len(copies),
        groups=[Group(original_queue=k[0], reason=k[1], letters=groups[k]) for k in chosen],
        originals=sorted({k[0] for k in keys if k[0]}), reasons=[r for r in REASONS if any(k[1] == r for k in keys)],
    )


def join_history(letters: list[DeadLetter]) -> None:
    """Attach each dead letter's `Message` and its latest TRAIL_STEPS deliveries (two queries)."""
    ids = {letter.copy.message_id for letter in letters if letter.copy.message_id}
    if not ids:
        return
    messages = {m.message_id: m for m in Message.objects.filter(message_id__in=ids).only(
        "message_id", "status", "origin", "exchange", "routing_key", "created_at")}
    trails: dict[int, list[Step]] = {}
    if messages:
        rows = (Delivery.objects.filter(message__in=[m.pk for m in messages.values()])
                .annotate(step=Window(RowNumber(), partition_by=[F("message")],
                                      order_by=[F("received_at").desc(), F("id").desc()]))
                .filter(step__lte=TRAIL_STEPS)
                .values_list("message", "queue", "received_at", "status", "attempt", "retry_delay", "error",
                             "death_reason", "dead_lettered_from"))
        for message, queue, received, status, attempt, delay, error, reason, source in rows:
            trails.setdefault(message, []).append(Step(
                queue=queue, received_at=received, status=status, attempt=attempt, retry_delay=delay,
                error=last_line(error), death_reason=reason, dead_lettered_from=source))
    for letter in letters:
        letter.message = messages.get(letter.copy.message_id)
        if letter.message is not None:
            letter.trail = sorted(trails.get(letter.message.pk, []), key=lambda s: s.received_at)


def last_line(error: str) -> str:
    """The last non-empty line of a traceback: the exception and its message."""
    lines = [line for line in (error or "").splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else ""
