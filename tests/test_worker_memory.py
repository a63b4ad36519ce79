"""The worker's memory is bounded in bytes: a backlog of large messages is recorded without holding it all."""
from __future__ import annotations

import os
import signal
import threading
import time

import pika
import pytest

from messaging.models import Delivery, Message
from tests.conftest import queue_depth, wait_for
from tests.consuming_checks import connect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MESSAGES = 400
BODY_BYTES = 5 * 1024 * 1024
PEAK_RSS_LIMIT = 600 * 1024 * 1024  # what issue #22 asks of 400 messages of 5 MiB


def publish_large(queue: str, count: int) -> list[str]:
    """Publish `count` confirmed, persistent messages of BODY_BYTES; random bytes (no compression helps
    the database), each made distinct by its prefix."""
    block = os.urandom(BODY_BYTES - 16)
    ids = [f"{queue}-{i}" for i in range(count)]
    conn = connect()
    try:
        channel = conn.channel()
        channel.queue_declare(queue=queue, durable=True)
        channel.confirm_delivery()
        for i, message_id in enumerate(ids):
            channel.basic_publish(exchange="", routing_key=queue, body=b"%016d" % i + block,
                                  properties=pika.BasicProperties(message_id=message_id, delivery_mode=2))
    finally:
        conn.close()
    return ids


class PeakRss:
    """The highest resident set size of a process, read from /proc while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/status") as status:
                    for line in status:
                        if line.startswith(("VmHWM:", "VmRSS:")):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return  # exited (a zombie's status has no Vm lines: nothing more to read)
            time.sleep(0.05)

    def join(self) -> int:
        self._thread.join(timeout=5)
        return self.peak


def test_a_backlog_of_large_messages_is_recorded_within_the_memory_bound(queue_name, manage):
    ids = publish_large(queue_name, MESSAGES)
    started = time.monotonic()
    # The default prefetch (2000) takes the whole backlog; stopped once all is recorded (not by
    # --max-messages, which counts a redelivery too if another test closes every connection meanwhile).
    worker = manage("consume", queue_name, "--inactivity-timeout", "120")
    rss = PeakRss(worker.proc.pid)
    acked = Delivery.objects.filter(queue=queue_name, status=Delivery.Status.ACKED)
    wait_for(lambda: acked.values("message").distinct().count() == MESSAGES or worker.proc.poll() is not None,
             timeout=240, interval=0.5, message="every message recorded")
    elapsed = time.monotonic() - started
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, worker.output
    peak = rss.join()
    print(f"consume: {MESSAGES} x {BODY_BYTES} bytes in {elapsed:.1f}s, peak RSS {peak / 2**20:.0f} MiB")
    assert sorted(set(acked.values_list("message__message_id", flat=True))) == sorted(ids)
    assert set(Message.objects.filter(message_id__in=ids).values_list("body_size", flat=True)) == {BODY_BYTES}
    assert queue_depth(queue_name)[0] == 0
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
