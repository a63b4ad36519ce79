"""Replay benchmark: `replay` (messaging.outbox.replay) against a bare pika drain, same broker, same run.

    .venv/bin/python bench/replay.py                       # SQLite (a throwaway file)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mailroom_bench_replay .venv/bin/python bench/replay.py

Each round dead-letters --count messages (published to a queue, rejected to its dead-letter queue)
and drains them back twice, interleaved: by a bare pika loop doing what replay promises without a
database (basic_get, a confirmed mandatory publish to the original queue, ack), and by Mailroom's
`replay` (basic_get, the replay written pending and committed, published with a confirm, its outcome
written, ack). Prints messages per second of each and their ratio (medians of the rounds).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdb import use_bench_database

use_bench_database("replay.sqlite3")

import django

django.setup()

import pika
from django.conf import settings
from django.core.management import call_command
from django.db import connection

from messaging.models import Message
from messaging.outbox.replay import replay, replay_headers

URL = settings.RABBITMQ_URL.split(",")[0]
BODY = b'{"greeting": "Hello World!", "n": 0000000}' + b" " * 58  # 100 bytes


def dead_letter(channel, queue: str, count: int) -> None:
    """Publish `count` letters to `queue` and reject them all to its dead-letter queue."""
    for i in range(count):
        channel.basic_publish(exchange="", routing_key=queue, body=BODY,
                              properties=pika.BasicProperties(message_id=f"{uuid.uuid4().hex}-{i}", delivery_mode=2))
    for _ in range(count):
        method, _, _ = channel.basic_get(queue=queue)
        channel.basic_nack(delivery_tag=method.delivery_tag, requeue=False)


def bare_drain(dlq: str, queue: str) -> tuple[int, float]:
    """(messages, seconds) of a bare pika loop: get, confirmed publish to `queue`, ack."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    taking, publishing = conn.channel(), conn.channel()
    publishing.confirm_delivery()
    count, t0 = 0, time.perf_counter()
    while True:
        method, properties, body = taking.basic_get(queue=dlq)
        if method is None:
            break
        properties.headers = replay_headers(properties.headers)
        publishing.basic_publish(exchange="", routing_key=queue, body=body, properties=properties, mandatory=True)
        taking.basic_ack(delivery_tag=method.delivery_tag)
        count += 1
    elapsed = time.perf_counter() - t0
    conn.close()
    return count, elapsed


def mailroom_drain(dlq: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    report = replay(queue=dlq)
    return len(report.steps), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="Messages per drain (default 2000).")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    call_command("migrate", verbosity=0)
    Message.objects.all().delete()  # the benchmark's own database: leftovers of an interrupted run go
    base = f"bench-replay-{uuid.uuid4().hex[:8]}"
    queue, dlx, dlq = base, f"{base}-dlx", f"{base}-dlq"
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.exchange_declare(exchange=dlx, exchange_type="fanout", durable=True)
    channel.queue_declare(queue=dlq, durable=True)
    channel.queue_bind(queue=dlq, exchange=dlx)
    channel.queue_declare(queue=queue, durable=True, arguments={"x-dead-letter-exchange": dlx})
    bare, mailroom = [], []
    try:
        for _ in range(args.rounds):
            for drain, rates in ((lambda: bare_drain(dlq, queue), bare), (lambda: mailroom_drain(dlq), mailroom)):
                dead_letter(channel, queue, args.count)
                count, seconds = drain()
                assert count == args.count, (count, args.count)
                rates.append(count / seconds)
                channel.queue_purge(queue)
            Message.objects.all().delete()
    finally:
        for name in (queue, dlq):
            channel.queue_delete(queue=name)
        channel.exchange_delete(exchange=dlx)
        conn.close()
    b, m = statistics.median(bare), statistics.median(mailroom)
    sys.stdout.write(
        f"database={connection.vendor} messages={args.count}x{args.rounds}\n"
        f"replay throughput: bare pika get/publish/ack {b:,.0f} msg/s, Mailroom replay {m:,.0f} msg/s, "
        f"ratio {m / b:.2f}; rounds {' '.join(f'{x / y:.2f}' for x, y in zip(mailroom, bare))}\n"
    )


if __name__ == "__main__":
    main()
