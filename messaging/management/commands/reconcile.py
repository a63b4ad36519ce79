"""`manage.py reconcile [--minutes N]`: letters published but never delivered, and Mailroom vs the broker."""
from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from messaging.audit.reconciling import DEFAULT_LOOKBACK, compare_queues, undelivered

LISTED = 100


class Command(BaseCommand):
    help = ("List letters published more than --minutes ago that no consumer has received, and compare, "
            "per queue, Mailroom's undelivered letters with the messages the broker holds. Exits 1 when "
            "the broker holds fewer (letters were lost or taken by a consumer Mailroom does not record).")

    def add_arguments(self, parser):
        parser.add_argument("--minutes", type=int, default=5, help="Grace period after publishing (default 5).")
        parser.add_argument("--lookback-hours", type=float, default=DEFAULT_LOOKBACK.total_seconds() / 3600,
                            help="How far before that to look (default 24).")

    def handle(self, *args, **options):
        minutes, lookback = options["minutes"], timedelta(hours=options["lookback_hours"])
        if minutes < 0 or lookback <= timedelta(0):
            raise CommandError("--minutes must be >= 0 and --lookback-hours > 0")
        messages = list(undelivered(minutes=minutes, lookback=lookback, limit=LISTED + 1))
        if not messages:
            self.stdout.write(f"Every letter published {minutes}+ minutes ago (within {lookback}) was delivered.")
        else:
            more = "+" if len(messages) > LISTED else ""
            self.stdout.write(f"{min(len(messages), LISTED)}{more} letter(s) published {minutes}+ minutes ago "
                              "were never delivered:")
            for m in messages[:LISTED]:
                self.stdout.write(f"  {m.message_id}  published {m.published_at:%Y-%m-%d %H:%M:%S}  to {m.destination}")
        mismatches = []
        for check in compare_queues(minutes=minutes, lookback=lookback):
            held = "missing" if check.ready is None else f"{check.ready} ready"
            consumers = "" if check.consumers is None else f", {check.consumers} consumer(s)"
            verdict = "MISMATCH" if check.mismatch else "ok"
            self.stdout.write(f"queue {check.queue!r}: Mailroom {check.undelivered} undelivered, broker {held}"
                              f"{consumers}: {verdict}")
            if check.mismatch:
                mismatches.append(check.queue)
            elif check.consumers == 0:
                self.stdout.write(f"  no consumer reads {check.queue!r}: its letters wait in the queue.")
        if mismatches:
            raise CommandError(f"the broker holds fewer messages than Mailroom's undelivered letters on "
                               f"{', '.join(repr(q) for q in mismatches)}: letters lost or consumed unrecorded")
