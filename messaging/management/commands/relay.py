"""`manage.py relay`: publish whatever is still pending (the outbox relay)."""
from __future__ import annotations

import logging

from django.core.management.base import BaseCommand

from messaging.management.commands.consume import (
    VERBOSITY_LEVELS,
    positive_float,
    positive_int,
)
from messaging.outbox.relay import Relay, RelayOptions
from messaging.stopping import stop_on_signals


class Command(BaseCommand):
    help = (
        "Publish pending letters (crashed requests, broker down or blocked, nacks) in batches with pipelined "
        "confirms, with backoff. Several relays may run at once. SIGINT/SIGTERM finish the batch in hand. "
        "Exits 1 when the broker refuses the login or vhost (the letters stay pending), and at once on a database "
        "without Mailroom's tables (run `python manage.py migrate`)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Publish what is due now, then exit.")
        parser.add_argument("--batch-size", type=positive_int, default=1000, help="Letters claimed at once, at most --window (default 1000).")
        parser.add_argument("--window", type=positive_int, default=1000, help="Unconfirmed letters in flight (default 1000).")
        parser.add_argument("--idle", type=positive_float, default=1.0, help="Seconds between polls when nothing is due.")
        parser.add_argument("--lease", type=positive_float, default=60.0,
                            help="SQLite: seconds a claimed batch is kept from other relays (default 60). "
                                 "PostgreSQL holds row locks instead, released when the batch is recorded.")

    def handle(self, *args, **options):
        logging.getLogger("messaging").setLevel(VERBOSITY_LEVELS.get(options["verbosity"], logging.INFO))
        relay = Relay(RelayOptions(
            batch_size=options["batch_size"], once=options["once"], idle_seconds=options["idle"],
            lease_seconds=options["lease"], window=options["window"],
        ))

        stop_on_signals(relay)  # a second signal leaves the batch in hand to be retried (SQLite: after its lease)
        code = relay.run()
        self.stdout.write(" ".join(f"{k}={v}" for k, v in sorted(relay.totals.items())) or "relayed=0")
        if code:
            raise SystemExit(code)
