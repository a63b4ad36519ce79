"""Consume benchmark: Mailroom's audited `consume` against a bare pika consumer, same broker, same run.

    .venv/bin/python bench/consume.py                       # SQLite (a throwaway file)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mailroom_bench .venv/bin/python bench/consume.py

Prints, each as a ratio to bare pika measured in the same run:
  * throughput: bare pika (prefetch 500, multiple-ack, no database) vs `consume` (records + commits + acks);
  * latency at 100 msg/s: p50 publish→callback (bare) vs p50 publish→row committed (Mailroom), each
    the median of --latency-rounds interleaved rounds;
  * memory: the consumer's RSS growth from 10k to 100k letters.
Targets (issue #3): throughput ≥ 0.5× on SQLite, ≥ 0.4× on PostgreSQL; latency ≤ 3×; growth < 20 MB.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare import bare_consume  # noqa: E402
from benchdb import use_bench_database  # noqa: E402

use_bench_database("consume.sqlite3")

import django  # noqa: E402

django.setup()

import pika  # noqa: E402  — the bench's bare side and producer use pika directly
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from messaging.consumer import recording  # noqa: E402
from messaging.consumer.registry import fewer_gc_passes  # noqa: E402
from messaging.consumer.worker import ConsumeOptions  # noqa: E402
from messaging.consumer.worker import Consumer as Worker  # noqa: E402
from messaging.models import Delivery  # noqa: E402

URL = settings.RABBITMQ_URL.split(",")[0]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fill(queue: str, n: int, *, body: bytes = b"x" * 200) -> None:
    """Put n persistent letters with message_ids in `queue` (publisher confirms, pipelined by batches)."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.queue_declare(queue=queue, durable=True)
    for i in range(n):
        ch.basic_publish(exchange="", routing_key=queue, body=body, properties=pika.BasicProperties(
            message_id=f"{queue}-{i}", delivery_mode=2, content_type="text/plain", headers={"n": i},
        ))
    # a synchronous round trip so everything above has reached the queue
    while ch.queue_declare(queue=queue, passive=True).method.message_count < n:
        conn.process_data_events(time_limit=0.05)
    conn.close()


def mailroom_consume(queue: str, n: int, *, prefetch: int, batch: int) -> float:
    worker = Worker(ConsumeOptions(queues=(queue,), prefetch=prefetch, batch_size=batch, max_messages=n))
    start = time.perf_counter()
    with fewer_gc_passes():  # as `manage.py consume` runs it
        worker.run()
    elapsed = time.perf_counter() - start
    assert Delivery.objects.filter(queue=queue, status=Delivery.Status.ACKED).count() == n
    return n / elapsed


def latency(queue: str, *, rate: float, seconds: float, mailroom: bool) -> float:
    """p50 milliseconds from publish to callback (bare) or to the row's commit (Mailroom)."""
    import threading

    samples: list[float] = []
    n = int(rate * seconds)
    stop = threading.Event()

    def produce():
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        ch = conn.channel()
        ch.queue_declare(queue=queue, durable=True)
        next_at = time.perf_counter()
        for i in range(n):
            next_at += 1 / rate
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ch.basic_publish(exchange="", routing_key=queue, body=b"x" * 200, properties=pika.BasicProperties(
                message_id=f"{queue}-{i}", delivery_mode=2, headers={"t0": time.time_ns() // 1000},
            ))
        conn.close()

    if mailroom:
        original = recording.record_batch

        def timed(batch, **kwargs):
            result = original(batch, **kwargs)
            now = time.time()
            samples.extend((now - r.properties.headers["t0"] / 1e6) * 1000 for r in batch)
            return result

        recording.record_batch = timed
        producer = threading.Thread(target=produce)
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        conn.channel().queue_declare(queue=queue, durable=True)
        conn.close()
        producer.start()
        try:
            with fewer_gc_passes():
                Worker(ConsumeOptions(queues=(queue,), max_messages=n)).run()
        finally:
            recording.record_batch = original
        producer.join()
    else:
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        ch = conn.channel()
        ch.queue_declare(queue=queue, durable=True)
        ch.basic_qos(prefetch_count=500)

        def on_message(channel, method, properties, body):
            samples.append((time.time() - properties.headers["t0"] / 1e6) * 1000)
            channel.basic_ack(delivery_tag=method.delivery_tag)

        ch.basic_consume(queue=queue, on_message_callback=on_message)
        producer = threading.Thread(target=produce)
        producer.start()
        while len(samples) < n:
            conn.process_data_events(time_limit=0.5)
        producer.join()
        conn.close()
    stop.set()
    return statistics.median(samples)


def memory_growth(queue: str, *, total: int, batch: int) -> tuple[float, float]:
    """RSS (MB) of the consuming process after 10k and after `total` letters."""
    marks: dict[int, float] = {}
    original = recording.record_batch
    seen = {"n": 0}

    def sampled(b, **kwargs):
        result = original(b, **kwargs)
        before = seen["n"]
        seen["n"] += len(b)
        for mark in (10_000, total):
            if before < mark <= seen["n"]:
                marks[mark] = rss_mb()
        return result

    fill(queue, total)
    recording.record_batch = sampled
    try:
        with fewer_gc_passes():
            Worker(ConsumeOptions(queues=(queue,), max_messages=total, batch_size=batch)).run()
    finally:
        recording.record_batch = original
    return marks[10_000], marks[total]


def analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def delete(queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    conn.channel().queue_delete(queue=queue)
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=30_000, help="letters per throughput run (default 30000)")
    parser.add_argument("--prefetch", type=int, default=ConsumeOptions().prefetch, help="default: consume's")
    parser.add_argument("--batch", type=int, default=ConsumeOptions().batch_size, help="default: consume's")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; the median is reported")
    parser.add_argument("--memory-total", type=int, default=100_000)
    parser.add_argument("--latency-rounds", type=int, default=3, help="interleaved latency rounds (default 3)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    import logging

    logging.getLogger("messaging").setLevel(logging.WARNING)
    call_command("migrate", verbosity=0)
    vendor = connection.vendor
    print(f"database={vendor} broker={pika.URLParameters(URL).host} n={args.n} prefetch={args.prefetch} batch={args.batch}")

    # Warm up: history in the tables and planner statistics, as a running system has them (autovacuum).
    q = f"bench-warm-{uuid.uuid4().hex[:8]}"
    try:
        fill(q, 10_000)
        mailroom_consume(q, 10_000, prefetch=args.prefetch, batch=args.batch)
    finally:
        delete(q)

    bare, ours = [], []
    for round_ in range(args.rounds):
        q = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            fill(q, args.n)
            bare.append(bare_consume(URL, q, args.n))
            fill(q, args.n)
            analyze()
            ours.append(mailroom_consume(q, args.n, prefetch=args.prefetch, batch=args.batch))
        finally:
            delete(q)
        print(f"  round {round_ + 1}: bare {bare[-1]:,.0f} msg/s, mailroom {ours[-1]:,.0f} msg/s")
    b, m = statistics.median(bare), statistics.median(ours)
    target = 0.5 if vendor == "sqlite" else 0.4
    print(f"throughput: bare pika {b:,.0f} msg/s, mailroom consume {m:,.0f} msg/s, ratio {m / b:.2f}x (target >= {target}x)")

    if not args.skip_latency:
        # Interleaved rounds (bare, Mailroom, bare, ...): this machine's wake-up latencies drift by tens of
        # percent from one minute to the next, which a single pair of runs reads as a change of ratio.
        bare_p50s, ours_p50s = [], []
        for round_ in range(args.latency_rounds):
            q1, q2 = f"bench-lat-{uuid.uuid4().hex[:8]}", f"bench-lat-{uuid.uuid4().hex[:8]}"
            try:
                bare_p50s.append(latency(q1, rate=100, seconds=10, mailroom=False))
                ours_p50s.append(latency(q2, rate=100, seconds=10, mailroom=True))
            finally:
                delete(q1)
                delete(q2)
            print(f"  latency round {round_ + 1}: bare p50 {bare_p50s[-1]:.2f} ms, mailroom p50 {ours_p50s[-1]:.2f} ms")
        bare_p50, ours_p50 = statistics.median(bare_p50s), statistics.median(ours_p50s)
        print(f"latency at 100 msg/s: bare p50 publish->callback {bare_p50:.2f} ms, mailroom p50 publish->row committed "
              f"{ours_p50:.2f} ms, ratio {ours_p50 / bare_p50:.2f}x (target <= 3x; medians of {args.latency_rounds} "
              f"interleaved rounds of 10 s)")

    if not args.skip_memory:
        q = f"bench-mem-{uuid.uuid4().hex[:8]}"
        try:
            at_10k, at_total = memory_growth(q, total=args.memory_total, batch=args.batch)
        finally:
            delete(q)
        print(f"memory: RSS {at_10k:.1f} MB at 10k letters, {at_total:.1f} MB at {args.memory_total // 1000}k, "
              f"growth {at_total - at_10k:.1f} MB (target < 20 MB)")


if __name__ == "__main__":
    main()
