"""`manage.py consume QUEUE [QUEUE ...]`: record every delivery, commit, then ack."""
from __future__ import annotations

import argparse
import logging

from django.core.management.base import BaseCommand, CommandError

from messaging.consumer import retries, streams
from messaging.consumer.handlers import handler_paths
from messaging.consumer.options import ConsumeOptions
from messaging.consumer.registry import fewer_gc_passes
from messaging.consumer.worker import Consumer
from messaging.stopping import stop_on_signals

VERBOSITY_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG, 3: logging.DEBUG}


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def byte_size(value: str) -> int:
    """A positive number of bytes, maybe with a binary suffix: 65536, 512K, 64M, 1G."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    scale = BYTE_SUFFIXES.get(text[-1:], 1)
    number = int(text[:-1] if text[-1:] in BYTE_SUFFIXES else text) * scale
    if number < 1:
        raise ValueError(value)
    return number


BYTE_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}


def stream_offset(value: str):
    """`--offset`: first, last, next, an offset or an ISO 8601 time (see `streams.parse_offset`)."""
    try:
        return streams.parse_offset(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(value)
    return number


def retry_delays(value: str):
    """`--retry-delays`, or argparse's usage error (exit code 2) saying what is wrong."""
    try:
        return retries.parse_delays(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Command(BaseCommand):
    help = (
        "Consume QUEUE(s) with manual acks: each delivery is recorded (Message + Delivery), committed, "
        "then acked. SIGINT/SIGTERM finish the batch in hand and exit 0; a second signal exits 1. "
        "Exits 1 at once on a database without Mailroom's tables (run `python manage.py migrate`)."
    )

    def add_arguments(self, parser):
        parser.add_argument("queues", nargs="*", help="Queues to consume; none with --exchange binds a server-named queue.")
        defaults = ConsumeOptions()
        parser.add_argument("--prefetch", type=positive_int, default=defaults.prefetch,
                            help=f"basic.qos prefetch count (default {defaults.prefetch}, what bench/consume.py "
                                 "shows best; use a small one, e.g. 1-10, with slow handlers so competing workers "
                                 "share fairly; --max-unacked-bytes bounds what large bodies take).")
        parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                            help="Most deliveries recorded in one commit and acked at once "
                                 f"(default {defaults.batch_size}; a batch is what one read brought, up to this).")
        parser.add_argument("--max-unacked-bytes", type=byte_size, default=defaults.max_unacked_bytes,
                            help="Most body bytes the worker holds received and not yet acked, whatever the "
                                 f"prefetch: it stops reading from the broker at this (default "
                                 f"{defaults.max_unacked_bytes // 2**20}M; a size in bytes, or with K, M or G). "
                                 "A single larger message is still taken, alone.")
        parser.add_argument("--max-messages", type=positive_int, help="Exit after N deliveries.")
        parser.add_argument("--inactivity-timeout", type=positive_float, help="Exit after S seconds without a delivery.")
        parser.add_argument("--handler", default="", help="Dotted path of a callable run with each letter (Message).")
        parser.add_argument("--max-retries", type=int, default=None,
                            help="Requeues of a letter whose handler fails before it is rejected (default 5; "
                                 "at once, with no delay: see --retry-delays).")
        parser.add_argument("--retry-delays", type=retry_delays, default=(),
                            help="Retry a letter whose handler failed after each of these delays, e.g. 1s,10s,1m "
                                 "(units ms, s, m, h, d), then reject it: one queue QUEUE.retry.<delay> per delay "
                                 "holds it meanwhile (declared with that TTL, dead-lettering back to QUEUE). "
                                 "Replaces --max-retries (both together are refused).")
        parser.add_argument("--dead-letter-queue", default="",
                            help="Declare this queue and a fanout exchange feeding it (--dead-letter-exchange, "
                                 "by default named as the queue), set as each queue's x-dead-letter-exchange: "
                                 "rejected letters go there. A queue that exists without it is refused.")
        parser.add_argument("--dead-letter-exchange", default="",
                            help="Declare this fanout exchange and set it as the queue's x-dead-letter-exchange.")
        parser.add_argument("--exchange", default="", help="Bind the queue(s) to this exchange.")
        parser.add_argument("--exchange-type", default="direct", choices=["direct", "fanout", "topic", "headers"])
        parser.add_argument("--binding-key", dest="binding_keys", action="append", default=[],
                            help="Binding key for --exchange (repeatable).")
        parser.add_argument("--durable", action=argparse.BooleanOptionalAction, default=None,
                            help="Declare a missing queue (and exchanges) durable, to survive a broker restart "
                                 "(default: MAILROOM_DURABLE, false: declared as the RabbitMQ tutorials declare "
                                 "theirs). An existing queue is used as it is.")
        parser.add_argument("--queue-type", default="", choices=["", "classic", "quorum", "stream"],
                            help="x-queue-type for a queue this command declares (quorum: durable, replicated). "
                                 "stream: read the queues as streams (a tap), declared if missing, taking nothing "
                                 "from their other readers; where it got to is stored with each batch.")
        parser.add_argument("--tap", default="", help="A stream tap's name: taps of different names keep their "
                            f"own offsets (default {streams.DEFAULT_TAP!r}; run one process per name).")
        parser.add_argument("--offset", type=stream_offset,
                            help="Where a stream tap starts: first, last, next, an offset or an ISO 8601 time "
                                 "(UTC if without zone). Overrides where the tap stopped; default: after the "
                                 f"last message it recorded, or {streams.DEFAULT_OFFSET!r} the first time.")
        parser.add_argument("--heartbeat", type=positive_int, default=30, help="AMQP heartbeat in seconds (default 30).")

    def handle(self, *args, **options):
        if not options["queues"] and not options["exchange"]:
            raise CommandError("Name a queue, or give --exchange to bind a server-named queue.")
        if options["max_retries"] is not None and options["max_retries"] < 0:
            raise CommandError("--max-retries must be 0 or more.")
        if options["retry_delays"]:
            if options["max_retries"] is not None:
                raise CommandError("Give --retry-delays or --max-retries, not both (each delay is one retry).",
                                   returncode=2)
            if not options["queues"]:
                raise CommandError("--retry-delays needs named queues (a server-named queue is gone on reconnecting).",
                                   returncode=2)
            try:
                retries.check_names(options["queues"], options["retry_delays"])
            except ValueError as exc:
                raise CommandError(f"--retry-delays: {exc}.", returncode=2) from exc
        if options["dead_letter_queue"] and options["dead_letter_queue"] in options["queues"]:
            raise CommandError("--dead-letter-queue must be another queue than those consumed.", returncode=2)
        stream_usage_errors(options)
        logging.getLogger("messaging").setLevel(VERBOSITY_LEVELS.get(options["verbosity"], logging.INFO))
        try:
            worker = Consumer(ConsumeOptions(
                queues=tuple(options["queues"]), prefetch=options["prefetch"], batch_size=options["batch_size"],
                max_unacked_bytes=options["max_unacked_bytes"],
                max_messages=options["max_messages"], inactivity_timeout=options["inactivity_timeout"],
                handler=options["handler"], max_retries=5 if options["max_retries"] is None else options["max_retries"],
                retry_delays=options["retry_delays"], dead_letter_queue=options["dead_letter_queue"],
                dead_letter_exchange=options["dead_letter_exchange"], exchange=options["exchange"],
                exchange_type=options["exchange_type"], binding_keys=tuple(options["binding_keys"]),
                durable=options["durable"], queue_type=options["queue_type"], heartbeat=options["heartbeat"],
                tap=options["tap"], offset=options["offset"],
            ))
        except ImportError as exc:
            raise CommandError(f"Cannot import the handler: {exc}") from exc

        stop_on_signals(worker)
        with fewer_gc_passes():  # this process runs one worker: the collector is its own
            code = worker.run()
        if code:
            raise CommandError("consume stopped on an error (see the log above)", returncode=code)


def stream_usage_errors(options) -> None:
    """Raise `CommandError` for options a stream tap cannot take, or tap options without a stream."""
    if options["queue_type"] != streams.STREAM:
        if options["tap"] or options["offset"] is not None:
            raise CommandError("--tap and --offset read a stream: add --queue-type stream.")
        return
    if not options["queues"]:
        raise CommandError("A stream needs a name (it cannot be server-named): consume NAME --queue-type stream.")
    if options["dead_letter_exchange"]:
        raise CommandError("A stream takes no --dead-letter-exchange: nothing is rejected from it.")
    try:
        handled = handler_paths(options["queues"], override=options["handler"])
    except ImportError as exc:
        raise CommandError(f"Cannot import the handler: {exc}") from exc
    if handled:
        raise CommandError(f"A stream tap runs no handler (a stream takes no requeue or reject): {', '.join(handled)} "
                           "has one (--handler or MAILROOM_QUEUE_HANDLERS).")
    if len(options["tap"]) > 200:
        raise CommandError("--tap: at most 200 characters.")
