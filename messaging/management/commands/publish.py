"""`manage.py publish QUEUE BODY`: the same outbox path as the publish form."""
from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from messaging.errors import InvalidMessage
from messaging.models import Message
from messaging.outbox.publishing import create_message
from messaging.outbox.requests import COMMAND_MAX_WAIT_SECONDS, publish_request, wait_seconds
from messaging.outbox.validation import decode_body

# The exit code of each outcome (1 is an invalid letter, 2 a usage error): scripts can tell them apart.
EXIT_CODES = {
    Message.Status.PUBLISHED: 0,  # confirmed by the broker and routed to a queue
    Message.Status.UNROUTABLE: 3,  # confirmed, but returned: no queue is bound for it (declared? --declare)
    Message.Status.FAILED: 4,  # refused for good (no such exchange, access refused, too large)
    Message.Status.PENDING: 5,  # no confirm (broker down or blocked): the relay publishes it later
}
NO_REPLY = 6  # --wait-reply: published, but no reply came within the wait


class Command(BaseCommand):
    help = (
        "Publish BODY to QUEUE (default exchange) or with --exchange; prints the letter's message_id and status. "
        "Exit codes: 0 published (confirmed and routed), 1 invalid letter, 2 usage error, 3 unroutable "
        "(no queue bound), 4 failed (refused), 5 pending (not confirmed yet: `manage.py relay` publishes it), "
        "6 no reply within --wait-reply's seconds."
    )

    def add_arguments(self, parser):
        parser.add_argument("routing_key", help="Queue name on the default exchange, or the routing key with --exchange.")
        parser.add_argument("body", help="The body; '-' reads it from standard input (bytes, as is).")
        parser.add_argument("--exchange", default="")
        parser.add_argument("--exchange-type", default="", choices=["", "direct", "fanout", "topic", "headers"])
        parser.add_argument("--declare", action="store_true",
                            help="Declare the queue/exchange if missing (durable when MAILROOM_DURABLE is true; "
                                 "an existing one is used as it is).")
        parser.add_argument("--content-type", default="text/plain")
        parser.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                            help="A header (repeatable); VALUE is parsed as JSON when it can be.")
        parser.add_argument("--message-id", default="")
        parser.add_argument("--correlation-id", default="")
        parser.add_argument("--transient", action="store_true", help="delivery_mode 1 instead of persistent.")
        parser.add_argument("--content-encoding", default="")
        parser.add_argument("--base64", action="store_true", help="BODY is base64 (a binary body).")
        parser.add_argument("--property", action="append", default=[], metavar="NAME=VALUE",
                            help="A standard property (priority, reply_to, expiration, timestamp, type, user_id, "
                                 "app_id); repeatable; VALUE is parsed as JSON when it can be.")
        parser.add_argument("--wait-reply", type=float, default=None, metavar="SECONDS",
                            help="Request/reply: publish with reply_to (direct reply-to unless --property reply_to=Q "
                                 "names a queue a `consume` worker reads) and a correlation_id, wait up to SECONDS "
                                 f"(at most {COMMAND_MAX_WAIT_SECONDS:g}) and print the reply's body; exit 6 "
                                 "when none came.")

    def handle(self, *args, **options):
        body = sys.stdin.buffer.read() if options["body"] == "-" else options["body"].encode("utf-8")
        headers = pairs(options["header"], option="--header")
        properties = pairs(options["property"], option="--property")
        if "expiration" in properties:
            properties["expiration"] = str(properties["expiration"])
        try:
            if options["base64"]:
                body = decode_body(body.decode("ascii", errors="replace"), encoding="base64")
            fields = {
                "exchange": options["exchange"], "exchange_type": options["exchange_type"],
                "declare": options["declare"], "routing_key": options["routing_key"], "body": body,
                "content_type": options["content_type"], "headers": headers, "message_id": options["message_id"],
                "correlation_id": options["correlation_id"], "delivery_mode": 1 if options["transient"] else 2,
                "content_encoding": options["content_encoding"], "properties": properties,
                "origin": Message.Origin.COMMAND,
            }
            wait = wait_seconds(options["wait_reply"], maximum=COMMAND_MAX_WAIT_SECONDS)
            if wait is not None:
                return self.request(wait=wait, **fields)
            with transaction.atomic():
                message = create_message(**fields)
        except InvalidMessage as exc:
            raise CommandError(str(exc)) from exc
        message.refresh_from_db()
        self.stdout.write(f"{message.message_id} {message.status}" + (f" ({message.last_error})" if message.last_error else ""))
        code = EXIT_CODES.get(message.status, 4)
        if code:
            raise CommandError(f"not published ({message.status}): {message.last_error or 'no confirm yet'}",
                               returncode=code)

    def request(self, *, wait: float, **fields) -> None:
        """Publish a request and print its reply's body (the request's message_id and status go to stderr)."""
        outcome = publish_request(wait=wait, **fields)
        request = outcome.request
        self.stderr.write(f"{request.message_id} {request.status}" + (f" ({request.last_error})" if request.last_error else ""))
        code = EXIT_CODES.get(request.status, 4)
        if code:
            raise CommandError(f"not published ({request.status}): {request.last_error or 'no confirm yet'}",
                               returncode=code)
        if outcome.reply is None:
            raise CommandError(outcome.note, returncode=NO_REPLY)
        self.stderr.write(outcome.note)
        body = bytes(outcome.reply.body)
        self.stdout.flush()
        sys.stdout.buffer.write(body if body.endswith(b"\n") else body + b"\n")
        sys.stdout.buffer.flush()


def pairs(items: list[str], *, option: str) -> dict:
    """NAME=VALUE options as a dict; VALUE parsed as JSON when it can be (numbers, booleans, lists)."""
    result = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"{option} needs NAME=VALUE, got {item!r}")
        try:
            result[name] = json.loads(value)
        except ValueError:
            result[name] = value
    return result
