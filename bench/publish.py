"""Publish benchmark: Mailroom's outbox against bare pika, same broker, same run.

    .venv/bin/python bench/publish.py                       # SQLite (a throwaway file)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mailroom_bench_publish .venv/bin/python bench/publish.py

Prints, each as a ratio to bare pika measured in the same run (medians of interleaved rounds):
  * relay throughput: `Relay` (claim → pipelined confirms → one UPDATE per outcome) vs a bare pika
    publisher with pipelined confirms (SelectConnection, window 1000, no database);
  * single publish step, p50: `publish_message` on a committed row (reused channel, the outcome
    written before it returns) vs a bare confirmed `basic_publish` on an open BlockingConnection
    channel, interleaved. Also printed: the publish part alone (`publish_once`, no outcome written),
    and so what writing the outcome adds.
Targets (issue #4): relay ≥ 0.5×; single publish step ≤ 1.5×.
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
from benchdb import use_bench_database  # noqa: E402

use_bench_database("publish.sqlite3")

import django  # noqa: E402

django.setup()

import pika  # noqa: E402  — the bench's bare side uses pika directly
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from messaging.models import Message  # noqa: E402
from messaging.outbox.publishing import publish_message, publish_once  # noqa: E402
from messaging.outbox.relay import Relay, RelayOptions  # noqa: E402

URL = settings.RABBITMQ_URL.split(",")[0]
BODY = b'{"greeting": "Hello World!", "n": 0000000}' + b" " * 58  # 100 bytes
logger = logging.getLogger("bench.publish")


def bare_pipelined(queue: str, count: int, *, window: int = 1000) -> float:
    """Messages per second of a bare pika publisher keeping `window` confirms in flight."""
    state = {"sent": 0, "acked": 0, "t0": 0.0, "t1": 0.0}

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_channel(channel):
        state["channel"] = channel
        channel.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda frame: start())

    def start():
        state["t0"] = time.perf_counter()
        pump()

    def pump():
        channel = state["channel"]
        while state["sent"] < count and state["sent"] - state["acked"] < window:
            state["sent"] += 1
            props = pika.BasicProperties(message_id=str(uuid.uuid4()), content_type="application/json", delivery_mode=2)
            channel.basic_publish("", queue, BODY, props, mandatory=True)

    def on_confirm(frame):
        method = frame.method
        state["acked"] = method.delivery_tag if method.multiple else state["acked"] + 1
        if state["acked"] >= count:
            state["t1"] = time.perf_counter()
            conn.close()
        else:
            pump()

    conn = pika.SelectConnection(pika.URLParameters(URL), on_open_callback=on_open,
                                 on_close_callback=lambda c, reason: c.ioloop.stop())
    conn.ioloop.start()
    return count / (state["t1"] - state["t0"])


def pending_messages(queue: str, count: int) -> list[Message]:
    now = timezone.now()
    messages = []
    for _ in range(count):
        message = Message(routing_key=queue, content_type="application/json", status=Message.Status.PENDING,
                          next_attempt_at=now, origin=Message.Origin.API)
        message.set_body(BODY)
        messages.append(message)
    return Message.objects.bulk_create(messages, batch_size=500)


def relay_rate(queue: str, count: int) -> float:
    pending_messages(queue, count)
    relay = Relay(RelayOptions(once=True, batch_size=1000, window=1000))
    started = time.perf_counter()
    relay.run()
    elapsed = time.perf_counter() - started
    assert relay.totals[Message.Status.PUBLISHED] == count, relay.totals
    return count / elapsed


def single_step_p50s(queue: str, count: int) -> tuple[float, float, float]:
    """p50 seconds of: a bare confirmed publish, Mailroom's publish step, and its publish part alone.

    Interleaved (bare, Mailroom, part, bare, ...) so all see the same broker and machine at each
    moment. The Mailroom step is `publish_message` on a committed pending row: the thread's
    long-lived channel, then one UPDATE of the outcome, committed before it returns.
    """
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.confirm_delivery()
    messages = pending_messages(queue, 2 * count + 1)
    publish_message(messages[0])  # the thread's channel opens once, as in a running web process
    bare, step, publish_part = [], [], []
    for i in range(count):
        props = pika.BasicProperties(message_id=str(uuid.uuid4()), content_type="application/json", delivery_mode=2)
        started = time.perf_counter()
        channel.basic_publish("", queue, BODY, props, mandatory=True)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        publish_message(messages[1 + i])
        step.append(time.perf_counter() - started)
        started = time.perf_counter()
        publish_once(messages[1 + count + i])  # the broker part only (its outcome is not recorded)
        publish_part.append(time.perf_counter() - started)
    conn.close()
    steps = messages[: count + 1]
    assert all(message.status == Message.Status.PUBLISHED for message in steps)
    assert Message.objects.filter(pk__in=[message.pk for message in steps], status=Message.Status.PUBLISHED).count() \
        == len(steps)
    return statistics.median(bare), statistics.median(step), statistics.median(publish_part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000, help="Messages per throughput round (default 20000).")
    parser.add_argument("--single", type=int, default=1000, help="Messages per latency round (default 1000).")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("messaging").setLevel(logging.WARNING)
    call_command("migrate", verbosity=0)
    Message.objects.all().delete()  # the benchmark's own database: leftovers of an interrupted run go
    queue = f"bench-publish-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.queue_declare(queue=queue, durable=True)
    bare, relayed, bare_step, step, part = [], [], [], [], []
    try:
        for _ in range(args.rounds):
            bare.append(bare_pipelined(queue, args.count))
            relayed.append(relay_rate(queue, args.count))
            channel.queue_purge(queue)
            b, s, p = single_step_p50s(queue, args.single)
            bare_step.append(b)
            step.append(s)
            part.append(p)
            channel.queue_purge(queue)
            Message.objects.all().delete()
    finally:
        channel.queue_delete(queue=queue)
        conn.close()
    vendor = connection.vendor
    b, r = statistics.median(bare), statistics.median(relayed)
    bs, s, p = statistics.median(bare_step), statistics.median(step), statistics.median(part)
    sys.stdout.write(
        f"database={vendor} messages={args.count}x{args.rounds} single={args.single}x{args.rounds}\n"
        f"relay throughput: bare pika pipelined {b:,.0f} msg/s, Mailroom relay {r:,.0f} msg/s, "
        f"ratio {r / b:.2f} (target >= 0.5); rounds {' '.join(f'{x / y:.2f}' for x, y in zip(relayed, bare))}\n"
        f"single publish p50: bare pika {bs * 1e3:.3f} ms, Mailroom {s * 1e3:.3f} ms, "
        f"ratio {s / bs:.2f} (target <= 1.5); rounds {' '.join(f'{x / y:.2f}' for x, y in zip(step, bare_step))}; "
        f"its publish part alone {p * 1e3:.3f} ms, ratio {p / bs:.2f}, writing the outcome adds "
        f"{max(s - p, 0) * 1e3:.3f} ms\n"
    )


if __name__ == "__main__":
    main()
