"""Replay: take messages from a dead-letter queue and publish each, through the outbox, to the queue
that dead-lettered it.

For each copy at the head of the dead-letter queue, in this order: take it (unacked) → write the
replay, a new `Message` (origin 'replay', `republished_from` the letter it copies), as pending and
commit → publish it with a confirm, write the outcome → ack the copy. A replay killed at any point
loses nothing: an unacked copy goes back to the dead-letter queue, and a rerun finds the replay it
already wrote, because its message_id is derived from the copy (its message_id, body and `x-death`
entry): pending, it is published; published, the copy is only acked. A kill between the confirm and
the ack publishes the replay twice under one message_id, which the consumer dedupes.

Decisions, each a sentence in the help and the README:

* **Where to.** The queue of the copy's most recent `x-death` entry (other than the dead-letter
  queue itself), published on the default exchange: only the queue that failed the message gets
  it again, not every queue its exchange fans out to. `to_queue` overrides it. A copy without a
  usable `x-death` (and no `to_queue`) is left in the dead-letter queue and reported.
* **Headers.** Kept as they came, except the dead-lettering history (`x-death`, `x-first-death-*`,
  `x-last-death-*`) and a quorum queue's `x-delivery-count`, which would count the replay's
  deliveries from the old ones. The history stays with the original: its `Delivery` rows' death
  columns. The properties are kept; doubles, bytes and timestamps are sent again as they came.
* **The original.** `republished_from` is the `Message` of the copy's message_id; a copy whose
  message_id Mailroom never recorded (a consumer other than Mailroom rejected it) is recorded
  first as the consumer would, an 'external' letter with the copy's headers (its `x-death`
  history too) and the exchange and routing key it was first published with.
* **No message_id.** A copy without one cannot be told from an identical copy, so its replay gets a
  fresh message_id: a kill between its commit and its ack can publish it twice (at least once).
* A copy whose replay is unroutable or refused is left in the dead-letter queue and reported; a
  publish without a confirm (broker down or blocked) stops the run, the replay pending for the
  relay or the next run, the copy in the dead-letter queue.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import IntegrityError, transaction

from messaging import conf
from messaging.amqp.codec import (
    PROPERTY_NAMES,
    header_encoding_error,
    read_properties,
    stored_message_id,
    text_value,
)
from messaging.amqp.deaths import Death, origin
from messaging.amqp.stored import DOUBLES, to_json
from messaging.amqp.subscription import Received
from messaging.amqp.taking import Taker
from messaging.errors import DuplicateMessageId, InvalidMessage
from messaging.models import Message
from messaging.outbox.publishing import new_message, publish_message, save_pending

logger = logging.getLogger(__name__)

# Headers the broker wrote about the copy's past, not the producer's: dropped from the replay.
HISTORY_HEADERS = ("x-death", "x-delivery-count")
HISTORY_PREFIXES = ("x-first-death-", "x-last-death-")
REPLAY_MARK = "~replay:"  # between the copied message_id and the digest that makes the replay's
REPLAY_SUFFIX = re.compile(re.escape(REPLAY_MARK) + r"[0-9a-f]{16}$")


class Outcome:
    """What became of one copy (the words the command prints)."""

    WOULD = "would replay"  # a dry run
    REPLAYED = "replayed"  # published, confirmed, the copy acked
    ALREADY = "already replayed"  # a rerun found the replay published: the copy acked
    SKIPPED = "skipped"  # left in the dead-letter queue: no target, or a copy that cannot be replayed
    UNROUTABLE = "unroutable"  # left in the dead-letter queue: the target queue is gone
    FAILED = "failed"  # left in the dead-letter queue: the broker refused the replay
    PENDING = "pending"  # no confirm: the run stops, the copy stays, the relay publishes the replay

    LEFT = frozenset({SKIPPED, UNROUTABLE, FAILED, PENDING})


@dataclass(frozen=True, kw_only=True)
class Step:
    """One copy taken from the dead-letter queue and what became of it."""

    message_id: str  # the copy's ('' when it has none)
    target: str  # the queue it goes (or would go) to; '' when there is none
    outcome: str  # an `Outcome`
    replay_id: str = ""  # the replay's message_id
    reason: str = ""

    def line(self) -> str:
        """The step as one line of text (untrusted names quoted with repr)."""
        text = f"{self.message_id or '(no message_id)'!r} -> {self.target or '(no target)'!r}: {self.outcome}"
        if self.replay_id:
            text += f" as {self.replay_id!r}"
        return text + (f" ({self.reason})" if self.reason else "")


@dataclass(kw_only=True)
class Report:
    """What a replay did, copy by copy, and why it stopped early (if it did)."""

    queue: str
    dry_run: bool
    steps: list[Step] = field(default_factory=list)
    stopped: str = ""  # why the run ended before the queue was empty or the limit reached

    def count(self, *outcomes: str) -> int:
        return sum(step.outcome in outcomes for step in self.steps)

    @property
    def left(self) -> int:
        """Copies taken but left in the dead-letter queue."""
        return self.count(*Outcome.LEFT)

    def summary(self) -> str:
        if self.dry_run:
            return f"{self.count(Outcome.WOULD)} of {len(self.steps)} would be replayed from {self.queue!r}" + \
                (f"; {self.count(Outcome.SKIPPED)} would be left there" if self.count(Outcome.SKIPPED) else "")
        text = (f"{self.count(Outcome.REPLAYED, Outcome.ALREADY)} replayed from {self.queue!r}"
                f" ({self.count(Outcome.ALREADY)} already by an earlier run)")
        if self.left:
            text += f"; {self.left} left there"
        return text + (f"; stopped: {self.stopped}" if self.stopped else "")


def replay(
    *, queue: str, limit: int | None = None, rate: float | None = None, dry_run: bool = False, to_queue: str = "",
    user=None, on_step: Callable[[Step], None] | None = None,
) -> Report:
    """Replay up to `limit` copies from dead-letter queue `queue` at most `rate` a second (see the module).

    `dry_run` takes each copy and puts it back without writing anything (the copies come back
    marked redelivered, a quorum queue counts the delivery, and they are out of the queue
    meanwhile). Copies left are put back at the end, so that none is taken twice: a run (or a
    `limit`) spends itself on the copies it cannot replay before those behind them. Raises
    `NoSuchQueue`, `ConnectionLost` or `FatalBrokerError` when the dead-letter queue cannot be read;
    `on_step` hears each step.
    """
    report = Report(queue=queue, dry_run=dry_run)
    held: list[int] = []  # copies taken and left: put back together at the end
    interval = 1.0 / rate if rate else 0.0
    with Taker(queue, timeout=conf.get("MAILROOM_PUBLISH_TIMEOUT")) as taker:
        started = time.monotonic()
        while limit is None or len(report.steps) < limit:
            if interval:  # the n-th copy is taken no sooner than n intervals after the start
                wait = started + len(report.steps) * interval - time.monotonic()
                if wait > 0:
                    taker.sleep(wait)
            copy = taker.take()
            if copy is None:
                break
            step = _preview(copy, queue=queue, to_queue=to_queue) if dry_run else \
                _replay_one(copy, queue=queue, to_queue=to_queue, user=user)
            report.steps.append(step)
            if on_step:
                on_step(step)
            if step.outcome in (Outcome.REPLAYED, Outcome.ALREADY):
                taker.ack(copy.delivery_tag)
            else:
                held.append(copy.delivery_tag)
            if step.outcome == Outcome.PENDING:
                report.stopped = f"the broker did not confirm the replay of {step.message_id!r}: {step.reason}"
                break
        taker.put_back(held)
    return report


def target_of(copy: Received, *, queue: str, to_queue: str = "") -> tuple[str, Death | None]:
    """Where a copy goes: `to_queue`, or the queue of its latest `x-death` entry other than `queue`."""
    death = origin(copy.properties.headers or {}, skip=(queue,))
    return (to_queue or (death.queue if death else "")), death


def replay_id(copy: Received, death: Death | None) -> str:
    """The replay's message_id: derived from the copy's message_id, body and `x-death` entry, so that
    a rerun finds the replay an interrupted run wrote; a fresh one for a copy without message_id."""
    copied = stored_message_id(copy.properties.message_id)[0] if copy.properties.message_id else ""
    if not copied:
        return f"replay:{uuid.uuid4()}"
    entry = [death.queue, death.reason, death.count, death.time.isoformat() if death.time else None] if death else None
    key = json.dumps([copied, hashlib.sha256(copy.body).hexdigest(), entry])
    suffix = REPLAY_MARK + hashlib.sha256(key.encode()).hexdigest()[:16]
    base = REPLAY_SUFFIX.sub("", copied)  # a replay replayed again: one suffix, not one per round
    return base[:255 - len(suffix)] + suffix


def replay_headers(headers: dict | None) -> dict:
    """The copy's headers without the broker's record of its past (`HISTORY_HEADERS`, `HISTORY_PREFIXES`)."""
    return {name: value for name, value in (headers or {}).items()
            if name not in HISTORY_HEADERS and not str(name).startswith(HISTORY_PREFIXES)}


def _preview(copy: Received, *, queue: str, to_queue: str) -> Step:
    message_id = _copied_id(copy)
    target, death = target_of(copy, queue=queue, to_queue=to_queue)
    if not target:
        return Step(message_id=message_id, target="", outcome=Outcome.SKIPPED, reason=NO_TARGET)
    rid = replay_id(copy, death) if message_id else ""
    done = bool(rid) and Message.objects.filter(message_id=rid, status=Message.Status.PUBLISHED).exists()
    return Step(message_id=message_id, target=target, outcome=Outcome.WOULD, replay_id=rid,
                reason="already published: the copy would only be acked" if done else "")


NO_TARGET = "no x-death entry names its queue; give --to-queue"


def _replay_one(copy: Received, *, queue: str, to_queue: str, user) -> Step:
    message_id = _copied_id(copy)
    target, death = target_of(copy, queue=queue, to_queue=to_queue)
    if not target:
        return Step(message_id=message_id, target="", outcome=Outcome.SKIPPED, reason=NO_TARGET)
    rid = replay_id(copy, death)
    try:
        with transaction.atomic():
            # The replay an earlier run wrote, and the original, in one look-up (their columns needed here).
            found = {m.message_id: m for m in Message.objects.filter(message_id__in={rid, message_id} - {""})
                     .only("id", "message_id", "origin", "status", "routing_key")}
            message, created = found.get(rid), False
            if message is None:
                original = (found.get(message_id) or _record_original(copy, death)) if message_id else None
                message = save_pending(_new_replay(copy, rid=rid, target=target, user=user, original=original))
                created = True
    except DuplicateMessageId:  # another run wrote it meanwhile: treat it as found
        message, created = Message.objects.get(message_id=rid), False
    except InvalidMessage as exc:
        return Step(message_id=message_id, target=target, outcome=Outcome.SKIPPED, reason=str(exc))
    if message.origin != Message.Origin.REPLAY:
        return Step(message_id=message_id, target=target, outcome=Outcome.SKIPPED, replay_id=rid,
                    reason="another letter already has the replay's message_id")
    if not created:  # found: an earlier run wrote it
        if message.status == Message.Status.PUBLISHED:
            return Step(message_id=message_id, target=message.routing_key, outcome=Outcome.ALREADY, replay_id=rid)
        message = Message.objects.get(pk=message.pk)  # all of it, to publish it
        publish_message(message)
    # A new replay was published by `save_pending` once its transaction committed.
    outcome = {Message.Status.PUBLISHED: Outcome.REPLAYED, Message.Status.UNROUTABLE: Outcome.UNROUTABLE,
               Message.Status.FAILED: Outcome.FAILED}.get(message.status, Outcome.PENDING)
    if outcome != Outcome.REPLAYED:
        logger.warning("message_id=%s replay %s to queue=%s: %s", rid, outcome, message.routing_key,
                       message.last_error or "no confirm", extra={"message_id": rid, "queue": message.routing_key})
    return Step(message_id=message_id, target=message.routing_key, outcome=outcome, replay_id=rid,
                reason="" if outcome == Outcome.REPLAYED else message.last_error)


def _copied_id(copy: Received) -> str:
    return stored_message_id(copy.properties.message_id)[0] if copy.properties.message_id else ""


def _new_replay(copy: Received, *, rid: str, target: str, user, original: Message | None) -> Message:
    """The replay's row, unsaved: the copy's body, headers (history dropped) and properties, to `target`."""
    p, headers = copy.properties, replay_headers(copy.properties.headers)
    problem = header_encoding_error(headers, floats_as_decimals=False)
    if problem:
        raise InvalidMessage(problem[0].upper() + problem[1:] + ".")
    stored = read_properties(p)
    message = new_message(
        routing_key=target, body=bytes(copy.body), content_type=stored["content_type"],
        content_encoding=stored["content_encoding"], correlation_id=stored["correlation_id"],
        delivery_mode=p.delivery_mode if p.delivery_mode in (1, 2) else 2, message_id=rid,
        origin=Message.Origin.REPLAY, user=user, republished_from=original,
    )
    # As a republished copy of a received letter: values tagged so that they go out as they came.
    message.headers = to_json(headers, floats=DOUBLES)
    message.properties = {name: to_json(getattr(p, name), floats=DOUBLES) for name in PROPERTY_NAMES
                          if getattr(p, name, None) not in (None, "")}
    return message


def _record_original(copy: Received, death: Death | None) -> Message:
    """The letter a copy is of, when Mailroom never saw it: recorded as the consumer would, 'external',
    with the copy's headers (its `x-death` history too) and the route it was first published on."""
    message_id, raw = stored_message_id(copy.properties.message_id)
    p, body = read_properties(copy.properties), bytes(copy.body)
    exchange = death.exchange if death else text_value(copy.exchange)[:255]
    routing_key = death.routing_keys[0] if death and death.routing_keys else text_value(copy.routing_key)[:255]
    original = Message(
        message_id=message_id, raw_message_id=raw, origin=Message.Origin.EXTERNAL, status=Message.Status.EXTERNAL,
        exchange=exchange, routing_key=routing_key, content_type=p["content_type"][:255],
        content_encoding=p["content_encoding"][:255], correlation_id=p["correlation_id"],
        delivery_mode=p["delivery_mode"], headers=p["headers"], properties=p["properties"], body=body,
    )
    try:
        with transaction.atomic():
            original.save()
    except IntegrityError:  # a consumer recorded it meanwhile
        return Message.objects.get(message_id=message_id)
    return original
