"""`manage.py replay DLQ`: publish dead-lettered messages again to the queues they came from."""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from messaging.amqp.codec import text_value
from messaging.errors import FatalBrokerError, MailroomError, NoSuchQueue
from messaging.management.commands.consume import positive_float, positive_int
from messaging.outbox.replay import Outcome, replay

# Exit codes, as `publish`'s where they apply (1 an error, 2 a usage error).
LEFT_IN_QUEUE = 3  # some copies were left in the dead-letter queue (no target, unroutable, refused): listed
NOT_CONFIRMED = 5  # the broker did not confirm a replay: run stopped; rerun (the relay may publish it meanwhile)


class Command(BaseCommand):
    help = (
        "Take messages from dead-letter queue DLQ and publish each, through the outbox, to the queue its x-death "
        "header says dead-lettered it (or --to-queue), on the default exchange: a new letter with origin 'replay' "
        "that records the letter it copies. Headers and properties are kept but the dead-lettering history "
        "(x-death, x-first-death-*, x-last-death-*, x-delivery-count). Each copy is acked only after its replay "
        "is confirmed; a rerun after a crash finishes what the last run started without publishing anew. "
        "Prints one line per copy. Exit codes: 0 done, 1 error (no such queue, broker down), 2 usage error, "
        "3 copies left in DLQ (no target, unroutable, refused), 5 stopped: a replay not confirmed (rerun)."
    )

    def add_arguments(self, parser):
        parser.add_argument("queue", metavar="DLQ", help="The dead-letter queue to take the messages from.")
        parser.add_argument("--limit", type=positive_int, default=None, help="Take at most N messages.")
        parser.add_argument("--rate", type=positive_float, default=None, help="At most R messages a second.")
        parser.add_argument("--dry-run", action="store_true",
                            help="List each message_id and where it would go; publish nothing, ack nothing. The "
                                 "messages are taken and put back, so they come back marked redelivered (and on a "
                                 "quorum queue their delivery count rises).")
        parser.add_argument("--to-queue", default="", metavar="Q",
                            help="Publish every message to queue Q instead of where x-death says it came from.")

    def handle(self, *args, **options):
        def show(step):
            self.stdout.write(text_value(step.line()))

        try:
            report = replay(queue=options["queue"], limit=options["limit"], rate=options["rate"],
                            dry_run=options["dry_run"], to_queue=options["to_queue"], on_step=show)
        except NoSuchQueue as exc:
            raise CommandError(f"{exc}.") from None
        except FatalBrokerError as exc:
            raise CommandError(f"{exc}; nothing was replayed.") from None
        except MailroomError as exc:  # the connection to the dead-letter queue: the copy in hand goes back
            raise CommandError(f"the broker connection failed ({exc}); run it again: what was replayed "
                               "stays replayed, the rest is in the dead-letter queue.") from None
        except KeyboardInterrupt:
            raise CommandError("interrupted: what was replayed stays replayed, the rest is in the dead-letter "
                               "queue; run it again to go on.") from None
        except DatabaseError as exc:
            raise CommandError(f"the database failed ({exc.__class__.__name__}: {exc}); run it again.") from None
        self.stdout.write(report.summary())
        if report.count(Outcome.PENDING):
            raise CommandError(report.stopped, returncode=NOT_CONFIRMED)
        if report.left and not report.dry_run:
            raise CommandError(f"{report.left} message(s) left in {options['queue']!r}: see above.",
                               returncode=LEFT_IN_QUEUE)
