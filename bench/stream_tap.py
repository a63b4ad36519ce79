"""Stream tap benchmark: `consume S --queue-type stream` against a bare pika stream reader, same broker, same run.

    .venv/bin/python bench/stream_tap.py                    # SQLite (a throwaway file)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mailroom_bench .venv/bin/python bench/stream_tap.py

Each round fills a fresh stream with -n messages and reads it from its first offset three ways: bare
pika (prefetch 500, ack multiple per socket read, no database); Mailroom's tap (records, commits the
batch with its offset, acks; one batch at a time, in order); and, for the cost of that order, Mailroom's
`consume` of a classic queue holding the same messages (its batches recorded on 2-3 threads at once).
Prints messages per second, each round and the medians, with the ratios to bare pika.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare import bare_consume  # noqa: E402
from benchdb import use_bench_database  # noqa: E402

use_bench_database("stream_tap.sqlite3")

import django  # noqa: E402

django.setup()

import pika  # noqa: E402  — the bench's bare side and producer use pika directly
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from messaging.consumer.registry import fewer_gc_passes  # noqa: E402
from messaging.consumer.worker import ConsumeOptions  # noqa: E402
from messaging.consumer.worker import Consumer as Worker  # noqa: E402
from messaging.models import Delivery, StreamOffset  # noqa: E402

URL = settings.RABBITMQ_URL.split(",")[0]
STREAM_ARGUMENTS = {"x-queue-type": "stream"}


def fill(queue: str, n: int, *, stream: bool, body: bytes = b"x" * 200) -> None:
    """Put n persistent messages with message_ids in `queue`, in one AMQP transaction."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.queue_declare(queue=queue, durable=True, arguments=STREAM_ARGUMENTS if stream else None)
    ch.tx_select()
    for i in range(n):
        ch.basic_publish(exchange="", routing_key=queue, body=body, properties=pika.BasicProperties(
            message_id=f"{queue}-{i}", delivery_mode=2, content_type="text/plain", headers={"n": i},
        ))
    ch.tx_commit()
    conn.close()


def mailroom_read(queue: str, n: int, *, stream: bool) -> float:
    options = ConsumeOptions(queues=(queue,), max_messages=n, queue_type="stream" if stream else "",
                             offset="first" if stream else None)
    worker = Worker(options)
    start = time.perf_counter()
    with fewer_gc_passes():  # as `manage.py consume` runs it
        worker.run()
    elapsed = time.perf_counter() - start
    assert Delivery.objects.filter(queue=queue, status=Delivery.Status.ACKED).count() == n
    if stream:
        assert StreamOffset.objects.get(stream=queue).offset == n - 1
    return n / elapsed


def delete(queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    conn.channel().queue_delete(queue=queue)
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20_000, help="messages per run (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    args = parser.parse_args()

    import logging

    logging.getLogger("messaging").setLevel(logging.WARNING)
    call_command("migrate", verbosity=0)
    print(f"database={connection.vendor} broker={pika.URLParameters(URL).host} n={args.n}")
    bare, tap, classic = [], [], []
    for round_ in range(args.rounds):
        stream, queue = f"stream-bench-{uuid.uuid4().hex[:8]}", f"bench-classic-{uuid.uuid4().hex[:8]}"
        try:
            fill(stream, args.n, stream=True)
            bare.append(bare_consume(URL, stream, args.n, arguments={"x-stream-offset": "first"}))
            tap.append(mailroom_read(stream, args.n, stream=True))
            fill(queue, args.n, stream=False)
            classic.append(mailroom_read(queue, args.n, stream=False))
        finally:
            delete(stream)
            delete(queue)
        print(f"  round {round_ + 1}: bare stream {bare[-1]:,.0f} msg/s, tap {tap[-1]:,.0f} msg/s, "
              f"classic consume {classic[-1]:,.0f} msg/s")
    b, t, c = (statistics.median(x) for x in (bare, tap, classic))
    print(f"median: bare {b:,.0f} msg/s; tap {t:,.0f} msg/s ({t / b:.2f}x bare); "
          f"classic consume {c:,.0f} msg/s ({c / b:.2f}x bare stream)")


if __name__ == "__main__":
    main()
