"""`manage.py consume QUEUE [QUEUE ...]`: record every delivery, commit, then ack."""
from __future__ import annotations

import argparse
import logging

from django.core.management.base import BaseCommand, CommandError

from messaging.consumer import streams
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
        parser.add_argument("--max-retries", type=int, default=5,
                            help="Requeues of a letter whose handler fails before it is rejected (default 5).")
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
        if options["max_retries"] < 0:
            raise CommandError("--max-retries must be 0 or more.")
        stream_usage_errors(options)
        logging.getLogger("messaging").setLevel(VERBOSITY_LEVELS.get(options["verbosity"], logging.INFO))
        try:
            worker = Consumer(ConsumeOptions(
                queues=tuple(options["queues"]), prefetch=options["prefetch"], batch_size=options["batch_size"],
                max_unacked_bytes=options["max_unacked_bytes"],
                max_messages=options["max_messages"], inactivity_timeout=options["inactivity_timeout"],
                handler=options["handler"], max_retries=options["max_retries"],
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
