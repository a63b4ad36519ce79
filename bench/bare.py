"""The bare side of the benchmarks: what pika alone does, measured in the same run as Mailroom."""
from __future__ import annotations

import time

import pika


def bare_consume(url: str, queue: str, n: int, *, arguments: dict | None = None) -> float:
    """Messages per second of a bare pika consumer: prefetch 500, ack multiple per socket read
    (`arguments`: the consumer's, e.g. a stream's `x-stream-offset`)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=500)
    state = {"count": 0, "last": 0}

    def on_message(channel, method, properties, body):
        state["count"] += 1
        state["last"] = method.delivery_tag

    ch.basic_consume(queue=queue, on_message_callback=on_message, arguments=arguments)
    start = time.perf_counter()
    while state["count"] < n:
        conn.process_data_events(time_limit=1)
        if state["last"]:
            ch.basic_ack(delivery_tag=state["last"], multiple=True)
            state["last"] = 0
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed
