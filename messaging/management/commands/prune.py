"""`manage.py prune --older-than 30d [--status S ...] [--dry-run]`: retention of the history."""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from messaging.audit.retention import DEFAULT_BATCH, parse_age, prune
from messaging.models import Message

# Pending letters are still to be published: never pruned unless asked for by name.
DEFAULT_STATUSES = [s for s in Message.Status.values if s != Message.Status.PENDING]


class Command(BaseCommand):
    help = ("Delete letters (and their deliveries) created more than --older-than ago, in batches of "
            "--batch-size, each in its own transaction. Pending letters are kept unless --status pending.")

    def add_arguments(self, parser):
        parser.add_argument("--older-than", required=True, help="Age like 30d, 12h, 90m or 2w.")
        parser.add_argument("--status", action="append", choices=Message.Status.values,
                            help=f"Only letters with this status (repeatable). Default: {', '.join(DEFAULT_STATUSES)}.")
        parser.add_argument("--dry-run", action="store_true", help="Count what would be deleted; delete nothing.")
        parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
        parser.add_argument("--pause", type=float, default=0.0, help="Seconds to sleep between batches.")

    def handle(self, *args, **options):
        try:
            age = parse_age(options["older_than"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        before = timezone.now() - age
        statuses = options["status"] or DEFAULT_STATUSES
        result = prune(before=before, statuses=statuses, batch_size=options["batch_size"],
                       dry_run=options["dry_run"], pause=options["pause"])
        verb = "Would delete" if options["dry_run"] else "Deleted"
        self.stdout.write(
            f"{verb} {result.messages} letter(s) and {result.deliveries} delivery(ies) created before "
            f"{before:%Y-%m-%d %H:%M:%S %Z} with status {', '.join(statuses)}"
            + ("" if options["dry_run"] else f" in {result.batches} batch(es)") + "."
        )
