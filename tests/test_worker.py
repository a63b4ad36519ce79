"""The `consume` worker's options, signals, the RabbitMQ tutorial patterns, and the worker registry."""
from __future__ import annotations

import signal
import socket
import time
from itertools import islice

import pika
import pytest
from django.core.management import call_command

from messaging.amqp.connection import handshake_error
from messaging.backoff import backoff_delays
from messaging.consumer import recording
from messaging.consumer.registry import GC_THRESHOLDS
from messaging.errors import ConnectionLost, FatalBrokerError
from messaging.models import Delivery, Message, Worker
from messaging.stopping import StopFlag
from tests.conftest import (
    delete_queue,
    management_api,
    rabbitmq_url_with,
    subprocess_env,
    wait_for,
)
from tests.consuming_checks import (
    acked_count,
    assert_exactly_once,
    connect,
    consumers,
    publish,
    queue_counts,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def exchange_name(queue_name):
    name = f"{queue_name}-x"
    yield name
    conn = connect()
    conn.channel().exchange_delete(exchange=name)
    conn.close()


def api(path: str):
    """GET the management API (RABBITMQ_MANAGEMENT_URL)."""
    return management_api(path, timeout=5)


def server_named_queues(exchange: str) -> list[str]:
    """Queues bound to `exchange`, from the management API."""
    return sorted({b["destination"] for b in api(f"exchanges/%2F/{exchange}/bindings/source")})


# --- options and signals ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, error", [
    ([], "Name a queue, or give --exchange"),
    (["q", "--max-retries", "-1"], "--max-retries must be 0 or more"),
    (["q", "--prefetch", "0"], "--prefetch"),
    (["q", "--queue-type", "lazy"], "--queue-type"),
])
def test_bad_options_are_refused(manage, args, error):
    worker = manage("consume", *args)
    assert worker.wait(timeout=30) != 0
    assert error in worker.output


def test_sigint_finishes_the_batch_and_exits_0_a_second_signal_exits_1(queue_name, manage):
    ids = publish(queue_name, 50, declare=True)
    worker = manage("consume", queue_name, "--handler", "tests.handlers.sleep_briefly", "--batch-size", "5",
                    "--prefetch", "10")
    wait_for(lambda: acked_count(queue_name) >= 5, timeout=30, message="a first batch acked")
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 0, worker.output
    # Nothing half-written: every delivery recorded is settled; the rest is back in the queue.
    statuses = set(Delivery.objects.filter(queue=queue_name).values_list("status", flat=True))
    assert statuses == {"acked"}
    assert queue_counts(queue_name) == (50 - acked_count(queue_name), 0)
    assert Worker.objects.get().status == Worker.Status.STOPPED

    stubborn = manage("consume", queue_name, "--handler", "tests.handlers.sleep_briefly", "--batch-size", "50")
    wait_for(lambda: Delivery.objects.filter(queue=queue_name).count() > acked_count(queue_name) or
             acked_count(queue_name) == 50, timeout=30, message="a second batch in hand")
    stubborn.signal(signal.SIGTERM)
    time.sleep(0.5)  # two signals at once would be delivered as one
    stubborn.signal(signal.SIGTERM)
    assert stubborn.wait(timeout=10) == 1, stubborn.output

    finisher = manage("consume", queue_name, "--inactivity-timeout", "3")
    assert finisher.wait(timeout=30) == 0, finisher.output
    assert_exactly_once(queue_name, ids)


def test_inactivity_timeout_and_max_messages(queue_name, manage):
    ids = publish(queue_name, 7, declare=True)
    worker = manage("consume", queue_name, "--max-messages", "5", "-v", "2")
    assert worker.wait(timeout=30) == 0, worker.output
    assert acked_count(queue_name) == 5
    assert queue_counts(queue_name) == (2, 0)
    assert worker.output.count(" acked") >= 5  # a line per delivery at -v 2
    idle = manage("consume", queue_name, "--inactivity-timeout", "2")
    assert idle.wait(timeout=30) == 0, idle.output
    assert "no delivery for 2.0s" in idle.output
    assert_exactly_once(queue_name, ids)


def test_copies_of_a_letter_in_concurrent_batches_are_numbered_in_order(queue_name, manage):
    """Two batches are recorded at once; a letter whose earlier copy is in the other batch waits for it.

    Three letters, each published 40 times, interleaved, in batches of 4: every copy must see the
    copies before it (attempts 1..40, one first delivery, the rest duplicates), and no acked delivery
    may be taken for a lost one.
    """
    conn = connect()
    channel = conn.channel()
    channel.queue_declare(queue=queue_name, durable=True)
    channel.confirm_delivery()
    letters = [f"{queue_name}-{k}" for k in range(3)]
    for i in range(40):
        for message_id in letters:
            channel.basic_publish("", queue_name, f"copy {i}".encode(),
                                  pika.BasicProperties(message_id=message_id, delivery_mode=2))
    conn.close()
    worker = manage("consume", queue_name, "--batch-size", "4", "--prefetch", "40", "--max-messages", "120")
    assert worker.wait(timeout=60) == 0, worker.output
    assert queue_counts(queue_name) == (0, 0)
    for message_id in letters:
        deliveries = Delivery.objects.filter(message__message_id=message_id)
        assert sorted(d.attempt for d in deliveries) == list(range(1, 41))
        assert [d.duplicate for d in deliveries.order_by("attempt")] == [False] + [True] * 39
        assert {d.status for d in deliveries} == {Delivery.Status.ACKED}
        assert not deliveries.exclude(error="").exists()
    assert Message.objects.filter(message_id__in=letters).count() == 3


# --- the tutorials --------------------------------------------------------------------------------
def test_work_queues_compete_with_fair_dispatch(queue_name, manage):
    """Tutorial 2: two workers on one queue; prefetch 1 sends more tasks to the faster one."""
    slow = manage("consume", queue_name, "--prefetch", "1", "--handler", "tests.handlers.sleep_briefly")
    wait_for(lambda: consumers(queue_name) == 1, message="the slow worker")
    fast = manage("consume", queue_name, "--prefetch", "1")
    wait_for(lambda: consumers(queue_name) == 2, message="the fast worker")
    ids = publish(queue_name, 30)
    wait_for(lambda: acked_count(queue_name) == 30, timeout=30, message="all tasks acked")
    for w in (slow, fast):
        w.signal(signal.SIGTERM)
        assert w.wait(timeout=10) == 0, w.output
    assert_exactly_once(queue_name, ids)
    by_worker = {w.pid: w.deliveries.count() for w in Worker.objects.all()}
    slow_count, fast_count = by_worker[slow.proc.pid], by_worker[fast.proc.pid]
    assert slow_count >= 1 and fast_count > slow_count, by_worker


def test_publish_subscribe_binds_exclusive_server_named_queues(exchange_name, manage):
    """Tutorial 3: every worker gets every letter on its own exclusive, server-named queue."""
    workers = [manage("consume", "--exchange", exchange_name, "--exchange-type", "fanout") for _ in range(2)]
    queues = wait_for(lambda: len(q := server_named_queues(exchange_name)) == 2 and q, message="two queues bound")
    assert all(q.startswith("amq.gen-") for q in queues)
    ids = publish("", 5, exchange=exchange_name, routing_key="")
    wait_for(lambda: Delivery.objects.filter(status="acked").count() == 10, timeout=30, message="10 deliveries")
    for w in workers:
        w.signal(signal.SIGTERM)
        assert w.wait(timeout=10) == 0, w.output
    assert Message.objects.count() == 5  # one letter, two deliveries
    assert sorted(q for row in Worker.objects.values_list("queues", flat=True) for q in row) == sorted(queues)
    for q in queues:
        assert_exactly_once(q, ids)
    assert wait_for(lambda: not server_named_queues(exchange_name), message="exclusive queues gone")


def test_routing_and_topics_with_repeated_binding_keys(exchange_name, manage):
    """Tutorials 4 and 5: only the letters matching a binding key reach the worker."""
    worker = manage("consume", "--exchange", exchange_name, "--exchange-type", "topic",
                    "--binding-key", "kern.*", "--binding-key", "*.critical")
    [queue] = wait_for(lambda: server_named_queues(exchange_name), message="the queue bound")
    kern = publish("", 1, exchange=exchange_name, routing_key="kern.info")
    critical = publish("", 1, exchange=exchange_name, routing_key="app.critical")
    publish("", 1, exchange=exchange_name, routing_key="app.info")
    wait_for(lambda: acked_count(queue) == 2, timeout=30, message="two deliveries")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert sorted(Delivery.objects.values_list("routing_key", flat=True)) == ["app.critical", "kern.info"]
    assert_exactly_once(queue, kern + critical)


def test_quorum_queue_and_existing_queue_used_as_it_is(queue_name, manage):
    worker = manage("consume", queue_name, "--queue-type", "quorum", "--max-messages", "3", "--inactivity-timeout", "20")
    wait_for(lambda: consumers(queue_name) == 1, message="the worker")
    assert api(f"queues/%2F/{queue_name}")["type"] == "quorum"
    ids = publish(queue_name, 3)
    assert worker.wait(timeout=30) == 0, worker.output
    # A plain `consume` of the same queue uses it as it is instead of failing on the arguments —
    # and the mismatch (which closes the channel) costs neither the other queue nor the prefetch.
    other = f"{queue_name}-plain"
    try:
        more, others = publish(queue_name, 2), publish(other, 2, declare=True)
        plain = manage("consume", other, queue_name, "--prefetch", "7")
        wait_for(lambda: acked_count(queue_name) == 5 and acked_count(other) == 2, timeout=30, message="both acked")
        # The management API lists consumers with its statistics, a few seconds late.
        prefetch = wait_for(lambda: (p := {c["queue"]["name"]: c["prefetch_count"] for c in api("consumers/%2F")})
                            and queue_name in p and other in p and p, timeout=20, message="the consumers listed")
        assert (prefetch[queue_name], prefetch[other]) == (7, 7), prefetch
        plain.signal(signal.SIGTERM)
        assert plain.wait(timeout=10) == 0, plain.output
        assert "type=quorum" in plain.output
        assert_exactly_once(queue_name, ids + more)
        assert_exactly_once(other, others)
    finally:
        delete_queue(other)


def test_two_queues_in_one_worker_and_its_registry_row(queue_name, manage):
    other = f"{queue_name}-b"
    try:
        worker = manage("consume", queue_name, other)
        wait_for(lambda: consumers(queue_name) == 1 and consumers(other) == 1, message="both queues consumed")
        a, b = publish(queue_name, 4), publish(other, 3)
        row = wait_for(lambda: Worker.objects.filter(acked=7).first(), timeout=20, message="the registry counts")
        assert (row.host, row.pid, row.queues, row.status) == (socket.gethostname(), worker.proc.pid,
                                                               [queue_name, other], "running")
        assert row.alive and row.heartbeat_at > row.started_at
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0, worker.output
        row.refresh_from_db()
        assert row.status == "stopped" and row.stopped_at is not None and not row.alive
        assert (row.acked, row.requeued, row.rejected) == (7, 0, 0)
        assert set(Delivery.objects.values_list("worker_id", flat=True)) == {row.pk}
        assert_exactly_once(queue_name, a)
        assert_exactly_once(other, b)
    finally:
        delete_queue(other)


# --- errors retrying cannot fix ------------------------------------------------------------------
@pytest.mark.parametrize("wrong, said", [
    pytest.param({"password": "not-the-password"}, "refused the login", id="password"),
    pytest.param({"vhost": "no-such-vhost"}, "ProbableAccessDeniedError", id="vhost"),
])
def test_wrong_credentials_or_vhost_exit_non_zero_without_a_reconnect_storm(queue_name, manage, wrong, said):
    worker = manage("consume", queue_name, env=subprocess_env(RABBITMQ_URL=rabbitmq_url_with(**wrong)))
    assert worker.wait(timeout=20) == 1, worker.output
    assert "cannot consume" in worker.output and said in worker.output
    assert "reconnecting" not in worker.output
    assert "not-the-password" not in worker.output
    assert Worker.objects.get().status == Worker.Status.STOPPED


def test_a_handshake_cut_short_is_fatal_only_before_the_first_login_or_when_refused():
    pe = pika.exceptions
    cut_short = pe.ProbableAuthenticationError(repr(pe.StreamLostError("Transport indicated EOF")))
    forced = pe.ProbableAccessDeniedError(repr(pe.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown")))
    refused = pe.ProbableAuthenticationError(repr(pe.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused")))
    no_vhost = pe.ProbableAccessDeniedError(repr(pe.ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost nope not found")))
    # A worker starting: any such failure is the settings'.
    assert all(isinstance(handshake_error(e, logged_in_before=False), FatalBrokerError) for e in (cut_short, forced, refused))
    # Once logged in, a broker stopping (or closing every connection) mid-handshake is retried, as
    # any lost connection is; an explicit refusal is still fatal.
    for e in (cut_short, forced):
        assert isinstance(handshake_error(e, logged_in_before=True), ConnectionLost)
    for e in (refused, no_vhost, pe.AuthenticationError("PLAIN")):
        assert isinstance(handshake_error(e, logged_in_before=True), FatalBrokerError)


def test_a_signal_during_a_wait_sets_the_stop_flag_without_a_lock():
    flag = StopFlag()
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: flag.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        started = time.monotonic()
        assert flag.wait(10) is True  # the handler's set() ends the wait within a step
        assert time.monotonic() - started < 1.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert flag.is_set() and flag.wait(0) is True
    assert StopFlag().wait(0.15) is False
    assert not hasattr(flag, "_cond") and not hasattr(flag, "_lock")  # nothing a handler could wait on


def test_the_cycle_collector_is_tuned_while_consuming_and_restored_after(queue_name, monkeypatch):
    import gc

    thresholds = gc.get_threshold()
    seen = []
    original = recording.record_batch

    def spying(batch, **kwargs):
        seen.append((gc.get_threshold(), gc.get_freeze_count() > 0))
        return original(batch, **kwargs)

    monkeypatch.setattr(recording, "record_batch", spying)
    ids = publish(queue_name, 3, declare=True)
    call_command("consume", queue_name, "--max-messages", "3", verbosity=0)  # the process's own collector
    assert seen and all(state == (GC_THRESHOLDS, True) for state in seen)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (thresholds, 0)  # nothing left out of its walks
    assert_exactly_once(queue_name, ids)


def test_reconnect_backoff_is_capped_exponential_with_jitter():
    runs = [list(islice(backoff_delays(), 12)) for _ in range(20)]
    assert all(1.0 <= d <= 30.0 for run in runs for d in run)  # at most one attempt a second, capped
    assert all(run[0] <= 2.0 and run[3] >= 8.0 and run[-1] >= 15.0 for run in runs)  # grows, then stays high
    assert len({run[-1] for run in runs}) > 1  # jittered: workers do not reconnect in lockstep


def test_backoff_goes_on_for_as_long_as_an_outage_lasts():
    # 2,000 retries is ~9 h of a broker outage at the 30 s cap: 2.0 ** 1024 would overflow a float.
    assert all(1.0 <= d <= 30.0 for d in islice(backoff_delays(), 2000))
    assert all(5.0 <= d <= 10.0 for d in islice(backoff_delays(cap=10.0), 1500, 2000))
