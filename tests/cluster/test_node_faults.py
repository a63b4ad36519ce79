"""Faults on a three-node cluster while the relay publishes from the outbox and two workers consume
a quorum queue: a node killed -9, a rolling restart, a partition, a disk alarm.

Every client lists the three nodes in RABBITMQ_URL and starts on one picked by its pid: a node kill or
a partition hits the node the first worker is on, so that the fault moves it. Each test ends with the same
proof (`assert_nothing_lost`): every letter published, recorded once as a Message with an acked
delivery, the queue empty, nothing left 'received'.
"""
from __future__ import annotations

import logging
import time

import pytest
from django.utils import timezone

from tests.cluster.harness import (
    Outbox,
    assert_nothing_lost,
    monotonic_wait,
    published_between,
    settle,
    start_crew,
)
from tests.conftest import subprocess_env, wait_for

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def under_load(outbox: Outbox, *, letters: int = 300) -> None:
    """Wait until the outbox has written `letters` more letters: the fault then happens mid-stream."""
    target = len(outbox.ids) + letters
    wait_for(lambda: len(outbox.ids) >= target, timeout=30, message="letters written")


def test_a_node_killed_and_restarted(on_cluster, queue_name, manage):
    crew = start_crew(manage, on_cluster, queue_name, env=subprocess_env())
    outbox = Outbox(queue_name).start()
    try:
        under_load(outbox)
        target = crew.node_of(on_cluster, crew.workers[0])
        on_cluster.kill(target)
        killed = timezone.now()
        under_load(outbox, letters=500)
        on_cluster.start(target)
        restarted = timezone.now()
        under_load(outbox)
    finally:
        outbox.stop()
    settle(outbox, queue_name, on_cluster)
    crew.stop()
    figures = assert_nothing_lost(outbox, queue_name, on_cluster)
    assert crew.reconnects() >= 1, "the worker on the killed node never moved"
    assert published_between(outbox, killed, restarted) > 0, "nothing was published while the node was down"
    logger.info("kill -9: %s", figures)


def test_a_rolling_restart_of_all_three_nodes(on_cluster, queue_name, manage):
    crew = start_crew(manage, on_cluster, queue_name, env=subprocess_env())
    outbox = Outbox(queue_name).start()
    restarts = []
    try:
        for n in (1, 2, 3):
            under_load(outbox, letters=200)
            # As RabbitMQ's upgrade guide says: stop a node only when its quorum queues keep a majority without it.
            on_cluster.await_quorum_plus_one(n)
            on_cluster.stop(n)
            stopped = timezone.now()
            under_load(outbox, letters=100)
            on_cluster.start(n)
            restarts.append((stopped, timezone.now()))
        under_load(outbox)
    finally:
        outbox.stop()
    settle(outbox, queue_name, on_cluster)
    crew.stop()
    figures = assert_nothing_lost(outbox, queue_name, on_cluster)
    assert crew.reconnects() >= 2
    assert all(published_between(outbox, *window) > 0 for window in restarts), "a restart stopped publishing"
    logger.info("rolling restart: %s", figures)


def test_a_partition_isolating_one_node_pauses_it_then_heals(on_cluster, queue_name, manage):
    crew = start_crew(manage, on_cluster, queue_name, env=subprocess_env())
    outbox = Outbox(queue_name).start()
    try:
        under_load(outbox)
        target = crew.node_of(on_cluster, crew.workers[0])
        others = [n for n in (1, 2, 3) if n != target]
        on_cluster.isolate(target)
        isolated = timezone.now()
        try:
            # pause_minority: the node sees neither peer, so it pauses; its clients move to the others.
            wait_for(lambda: not on_cluster.is_running(target), timeout=20, interval=0.3, message="the node to pause")
            assert all(on_cluster.is_running(n) for n in others)
            monotonic_wait(10)
        finally:
            on_cluster.heal(target)
        healed = timezone.now()
        wait_for(lambda: on_cluster.is_running(target), timeout=30, interval=0.3, message="the node to resume")
        under_load(outbox)
    finally:
        outbox.stop()
    settle(outbox, queue_name, on_cluster)
    crew.stop()
    figures = assert_nothing_lost(outbox, queue_name, on_cluster)
    assert crew.reconnects() >= 1, "the worker was not moved off the paused node"
    # Not asserted: in most runs the relay's publishes were nacked for the whole partition (kept
    # pending, published at the heal), while a bare pika publisher is acked through node 2 within a
    # second of the cut. Logged, to be understood (docs/performance.md).
    figures["published_while_isolated"] = published_between(outbox, isolated, healed)
    # pause_minority left no partition to resolve by hand.
    assert "mailroom-test" not in on_cluster.ctl(others[0], "eval", "rabbit_node_monitor:partitions().").replace(
        "[]", ""), "a partition is still recorded"
    logger.info("partition: %s", figures)


def test_a_disk_alarm_on_one_node_holds_publishing_then_resumes(on_cluster, queue_name, manage):
    crew = start_crew(manage, on_cluster, queue_name, env=subprocess_env(MAILROOM_PUBLISH_TIMEOUT="2"))
    outbox = Outbox(queue_name).start()
    try:
        under_load(outbox)
        # An alarm on node 3 blocks publishers on every node of the cluster; consumers go on.
        on_cluster.ctl(3, "set_disk_free_limit", "1000000GB")
        try:
            wait_for(lambda: not on_cluster.healthy(), timeout=20, interval=0.3, message="the alarm")
            time.sleep(1)  # publishes confirmed before the block arrived
            blocked = timezone.now()
            under_load(outbox, letters=150)
            assert published_between(outbox, blocked, timezone.now()) == 0, "published through an alarm"
        finally:
            on_cluster.ctl(3, "set_disk_free_limit", "50MB")
        wait_for(on_cluster.healthy, timeout=20, interval=0.3, message="the alarm to clear")
        under_load(outbox)
    finally:
        outbox.stop()
    settle(outbox, queue_name, on_cluster)
    crew.stop()
    figures = assert_nothing_lost(outbox, queue_name, on_cluster)
    logger.info("disk alarm: %s", figures)
