"""Seed a PostgreSQL database with a large history: N letters and about 2 deliveries each.

    .venv/bin/python bench/seed.py --letters 1000000                  # into mailroom_scale
    .venv/bin/python bench/seed.py --letters 10000 --database mailroom_scale_10k

The rows are generated inside PostgreSQL (`INSERT … SELECT … FROM generate_series`), the fastest
way in: no row crosses the socket. Indexes are dropped during the load and rebuilt after it, then
the tables are analysed. Traffic is the same whatever N: one letter every 3.6 s (1,000 an hour),
the newest a minute ago, so a bigger N means a longer history, not a busier last hour.

Mix: 10% of letters go to the default exchange (queue `bench.qK`) and are delivered twice (requeued,
then acked as a redelivery); 90% go through the topic exchange `bench.topic` and are delivered
once to each of two queues (`bench.qK.a`, `bench.qK.b`; 3% also to `bench.qK.audit`), 1%
rejected. 0.5% failed, 0.5% unroutable, 0.5% pending (never delivered), 2% from outside producers.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
logger = logging.getLogger("bench.seed")

LETTERS_SQL = """
INSERT INTO messaging_message (
    id, message_id, origin, exchange, exchange_type, routing_key, declare, body, body_size, body_sha256,
    content_type, content_encoding, correlation_id, delivery_mode, headers, properties, status, last_error,
    attempts, next_attempt_at, published_by_id, republished_from_id, created_at, published_at)
SELECT i, 'bench-' || i,
    CASE WHEN i %% 50 = 4 THEN 'external' WHEN i %% 3 = 0 THEN 'form' WHEN i %% 3 = 1 THEN 'api' ELSE 'command' END,
    CASE WHEN i %% 10 = 0 THEN '' ELSE 'bench.topic' END,
    CASE WHEN i %% 10 = 0 THEN '' ELSE 'topic' END,
    'bench.q' || (i %% 20), false,
    convert_to('letter ' || i, 'UTF8'), length('letter ' || i), encode(sha256(convert_to('letter ' || i, 'UTF8')), 'hex'),
    'text/plain', '', 'corr-' || i, 2, jsonb_build_object('n', i), '{}'::jsonb,
    CASE WHEN i %% 200 = 0 THEN 'failed' WHEN i %% 200 = 1 THEN 'unroutable' WHEN i %% 200 = 2 THEN 'pending'
         WHEN i %% 50 = 4 THEN 'external' ELSE 'published' END,
    CASE WHEN i %% 200 = 0 THEN 'ChannelClosedByBroker: 404 NOT_FOUND' WHEN i %% 200 = 1 THEN 'returned: 312 NO_ROUTE'
         ELSE '' END,
    1, NULL, NULL, NULL,
    %(newest)s - (%(n)s - i) * interval '3.6 seconds',
    CASE WHEN i %% 200 IN (0, 2) THEN NULL ELSE %(newest)s - (%(n)s - i) * interval '3.6 seconds' + interval '20 ms' END
FROM generate_series(1, %(n)s) AS i
"""

DELIVERIES_SQL = """
INSERT INTO messaging_delivery (
    message_id, queue, consumer_tag, delivery_tag, redelivered, attempt, duplicate, exchange, routing_key, status,
    worker_id, received_at, handled_at, settled_at, error, body_size, body_sha256, anomaly)
SELECT m.id,
    CASE WHEN m.exchange = '' THEN m.routing_key
         ELSE m.routing_key || CASE WHEN j = 1 THEN '.a' WHEN j = 2 THEN '.b' ELSE '.audit' END END,
    'ctag-1', m.id, m.exchange = '' AND j = 2, CASE WHEN m.exchange = '' THEN j ELSE 1 END, false,
    m.exchange, m.routing_key,
    CASE WHEN m.exchange = '' AND j = 1 THEN 'requeued' WHEN m.id % 100 = 3 AND j = 1 THEN 'rejected' ELSE 'acked' END,
    1 + m.id % 3, m.published_at + j * interval '100 ms', m.published_at + j * interval '100 ms' + interval '5 ms',
    m.published_at + j * interval '100 ms' + interval '6 ms',
    CASE WHEN m.exchange = '' AND j = 1 THEN 'handler raised: TimeoutError'
         WHEN m.id % 100 = 3 AND j = 1 THEN 'Traceback: ValueError: bad input' ELSE '' END,
    m.body_size, m.body_sha256, ''
FROM messaging_message m CROSS JOIN generate_series(1, 3) AS j
WHERE m.status IN ('published', 'external') AND (j < 3 OR m.id % 100 IN (11, 12, 13))
ORDER BY m.id, j
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--letters", type=int, default=1_000_000)
    parser.add_argument("--database", default="mailroom_scale", help="PostgreSQL database (dropped and created again)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import psycopg

    with psycopg.connect(f"postgresql://postgres@{args.host}:5432/postgres", autocommit=True) as admin:
        # A fresh database each time: migrations give the exact schema and indexes to rebuild.
        admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{args.database}"')
    os.environ["DATABASE_URL"] = f"postgres://postgres@{args.host}:5432/{args.database}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("""SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('messaging_message', 'messaging_delivery')
                          AND indexname NOT LIKE '%pkey'
                          AND indexname NOT IN (SELECT conname FROM pg_constraint)""")
        indexes = cursor.fetchall()
        for name, _ in indexes:
            cursor.execute(f'DROP INDEX "{name}"')
        now = timezone.now()
        cursor.execute("""INSERT INTO messaging_worker (id, host, pid, queues, status, started_at, heartbeat_at, acked, requeued, rejected)
                          SELECT w, 'bench-host', 1000 + w, '["bench.q1"]', 'stopped', %s, %s, 0, 0, 0 FROM generate_series(1, 3) w""",
                       [now, now])
        cursor.execute(LETTERS_SQL, {"n": args.letters, "newest": now - timezone.timedelta(minutes=1)})
        logger.info("letters=%s in %.0fs", args.letters, time.monotonic() - started)
        cursor.execute(DELIVERIES_SQL)
        cursor.execute("SELECT count(*) FROM messaging_delivery")
        deliveries = cursor.fetchone()[0]
        logger.info("deliveries=%s in %.0fs", deliveries, time.monotonic() - started)
        cursor.execute("SELECT setval(pg_get_serial_sequence('messaging_message', 'id'), %s)", [args.letters])
        for name, definition in indexes:
            cursor.execute(definition)
        logger.info("indexes rebuilt (%s) in %.0fs", len(indexes), time.monotonic() - started)
    connection.close()
    # VACUUM (for index-only scans) and ANALYZE (for the planner) outside any transaction.
    with psycopg.connect(os.environ["DATABASE_URL"].replace("postgres://", "postgresql://"), autocommit=True) as db:
        db.execute("VACUUM ANALYZE messaging_message")
        db.execute("VACUUM ANALYZE messaging_delivery")
    logger.info("seeded %s letters and %s deliveries into %s in %.0fs",
                args.letters, deliveries, args.database, time.monotonic() - started)


if __name__ == "__main__":
    main()
