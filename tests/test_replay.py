"""Replay: a dead-letter queue drained back to the queues its messages died in, each acked once there.

Real subprocesses throughout: `consume` rejects letters to a dead-letter exchange (genuine `x-death`
entries, written by RabbitMQ), `replay` publishes them back, `consume` with a handler that succeeds
takes them; one replay is killed with SIGKILL halfway and run again.
"""
from __future__ import annotations

import contextlib
import io
import signal
import uuid
from types import SimpleNamespace

import pika
import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import Client

from messaging.models import Delivery, Message
from messaging.web.replay import replay_url
from tests.conftest import delete_queue, queue_depth, subprocess_env, wait_for
from tests.consuming_checks import (
    connect,
    consumers,
    publish,
    queue_counts,
)
from tests.test_republish_fidelity import HEADERS, PROPERTIES, same

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dead_letters():
    """A queue whose rejects go, through a fanout dead-letter exchange, to a dead-letter queue (all durable)."""
    base = f"replay-{uuid.uuid4().hex[:8]}"
    names = SimpleNamespace(queue=base, exchange=f"{base}-dlx", dlq=f"{base}-dlq", other=f"{base}-other")
    conn = connect()
    channel = conn.channel()
    channel.exchange_declare(exchange=names.exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(queue=names.dlq, durable=True)
    channel.queue_bind(queue=names.dlq, exchange=names.exchange)
    channel.queue_declare(queue=names.queue, durable=True, arguments={"x-dead-letter-exchange": names.exchange})
    conn.close()
    yield names
    for name in (names.queue, names.dlq, names.other):
        delete_queue(name)
    conn = connect()
    with contextlib.suppress(pika.exceptions.AMQPError):
        conn.channel().exchange_delete(exchange=names.exchange)
    conn.close()


def reject_all(queue: str, count: int) -> None:
    """Take `count` letters from `queue` and reject them without requeue (a plain pika consumer's nack)."""
    conn = connect()
    try:
        channel = conn.channel()
        for _ in range(count):
            method, _, _ = channel.basic_get(queue=queue)
            assert method is not None, f"{queue} has fewer than {count} letters"
            channel.basic_nack(delivery_tag=method.delivery_tag, requeue=False)
    finally:
        conn.close()


def ready(queue: str) -> int:
    """Messages ready in `queue` (a passive declare: quicker than rabbitmqctl)."""
    return queue_depth(queue)[0]


def handled(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def consume_replays(manage, names, tmp_path, *, count: int):
    """Run `consume QUEUE` with a handler that succeeds until `count` replays are acked there; return the log."""
    log = tmp_path / "handled.log"
    worker = manage("consume", names.queue, "--durable", "--handler", "tests.handlers.note",
                    "--dead-letter-exchange", names.exchange, env=subprocess_env(HANDLER_LOG=str(log)))
    wait_for(lambda: Delivery.objects.filter(queue=names.queue, status=Delivery.Status.ACKED,
                                             message__origin=Message.Origin.REPLAY).count() >= count,
             timeout=30, message=f"{count} replays acked on the original queue")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, worker.output
    return log


def test_a_failing_handlers_dead_letters_are_replayed_and_acked_once(dead_letters, manage, tmp_path):
    names = dead_letters
    failing = manage("consume", names.queue, "--durable", "--handler", "tests.handlers.fail", "--max-retries", "0",
                     "--dead-letter-exchange", names.exchange)
    wait_for(lambda: consumers(names.queue) >= 1, message="the failing worker to consume")
    ids = publish(names.queue, 20, prefix=names.queue)
    wait_for(lambda: queue_depth(names.dlq)[0] == 20, timeout=30, message="20 letters dead-lettered")
    failing.signal(signal.SIGTERM)
    assert failing.wait(timeout=15) == 0, failing.output
    assert Delivery.objects.filter(queue=names.queue, status=Delivery.Status.REJECTED).count() == 20

    run = manage("replay", names.dlq)
    assert run.wait(timeout=30) == 0, run.output
    assert run.output.count(": replayed as ") == 20, run.output
    assert ready(names.dlq) == 0
    assert queue_depth(names.queue)[0] == 20  # on the queue that failed them, nowhere else

    log = consume_replays(manage, names, tmp_path, count=20)
    replays = list(Message.objects.filter(origin=Message.Origin.REPLAY).select_related("republished_from"))
    assert len(replays) == 20
    assert sorted(r.republished_from.message_id for r in replays) == sorted(ids)
    assert all(r.status == Message.Status.PUBLISHED and (r.exchange, r.routing_key) == ("", names.queue)
               for r in replays)
    # The history stays on the original's deliveries; the replay carries the producer's headers only.
    assert all(not any(k.startswith(("x-death", "x-first-death", "x-last-death")) for k in r.headers) for r in replays)
    assert all(r.body == r.republished_from.body for r in replays)
    for r in replays:
        deliveries = list(r.deliveries.all())
        assert [(d.queue, d.status, d.duplicate, d.anomaly) for d in deliveries] == \
               [(names.queue, Delivery.Status.ACKED, False, Delivery.Anomaly.NONE)], r.message_id
        assert deliveries[0].handled_at is not None
    assert sorted(handled(log)) == sorted(r.message_id for r in replays)
    assert ready(names.queue) == 0
    assert ready(names.dlq) == 0


def test_a_replay_killed_halfway_and_run_again_acks_each_letter_once(dead_letters, manage, tmp_path):
    names = dead_letters
    ids = publish(names.queue, 20, prefix=names.queue)
    reject_all(names.queue, 20)  # a plain pika consumer's rejects: Mailroom never recorded these letters
    wait_for(lambda: queue_depth(names.dlq)[0] == 20, message="20 letters dead-lettered")

    slow = manage("replay", names.dlq, "--rate", "10")
    wait_for(lambda: slow.output.count(": replayed as ") >= 8, timeout=20, message="8 replays")
    slow.signal(signal.SIGKILL)
    slow.wait(timeout=10)
    assert Message.objects.filter(origin=Message.Origin.REPLAY, status=Message.Status.PUBLISHED).count() < 20
    wait_for(lambda: queue_counts(names.dlq)[1] == 0, message="the killed replay's copy in hand back in the queue")

    rerun = manage("replay", names.dlq)
    assert rerun.wait(timeout=30) == 0, rerun.output
    assert ready(names.dlq) == 0

    log = consume_replays(manage, names, tmp_path, count=20)
    replays = list(Message.objects.filter(origin=Message.Origin.REPLAY).select_related("republished_from"))
    assert sorted(r.republished_from.message_id for r in replays) == sorted(ids)  # one replay per letter
    # The originals, never seen by Mailroom, were recorded as another producer's from their dead copies.
    assert set(Message.objects.filter(message_id__in=ids).values_list("origin", flat=True)) == {"external"}
    assert_handled_once(names.queue, replays, log)
    assert ready(names.dlq) == 0


def assert_handled_once(queue: str, replays: list[Message], log) -> None:
    """Each replay handled and acked once on `queue`; any other delivery of it an acked duplicate.

    `assert_exactly_once` with one difference: a kill between a replay's publish and the write of its
    outcome publishes it again on the rerun, so a second delivery may be a new publish of the same
    message_id rather than a redelivery (not flagged redelivered). The consumer's dedupe covers both.
    """
    for replay in replays:
        trail = [(d.attempt, d.status, d.duplicate, d.redelivered) for d in replay.deliveries.order_by("pk")]
        first, *later = trail
        assert first[1:3] == (Delivery.Status.ACKED, False), (replay.message_id, trail)
        assert all(status == Delivery.Status.ACKED and duplicate for _, status, duplicate, _ in later), trail
        assert [attempt for attempt, *_ in trail] == list(range(1, len(trail) + 1)), trail
    assert sorted(handled(log)) == sorted(r.message_id for r in replays)  # the handler ran once for each
    assert Delivery.objects.filter(queue=queue).exclude(message__in=replays).count() == 0
    assert queue_counts(queue) == (0, 0)


def run_replay(*args: str) -> tuple[int, str]:
    """`manage.py replay ARGS` in this process: (exit code, output)."""
    out = io.StringIO()
    try:
        call_command("replay", *args, stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def test_dry_run_lists_where_each_would_go_and_takes_nothing(dead_letters, fresh_publisher):
    names = dead_letters
    ids = publish(names.queue, 5, prefix=names.queue)
    reject_all(names.queue, 5)
    wait_for(lambda: queue_depth(names.dlq)[0] == 5, message="5 letters dead-lettered")

    code, output = run_replay(names.dlq, "--dry-run")
    assert code == 0, output
    for message_id in ids:
        assert f"'{message_id}' -> '{names.queue}': would replay as '{message_id}~replay:" in output
    assert "5 of 5 would be replayed" in output
    assert ready(names.dlq) == 5
    assert Message.objects.count() == 0  # nothing written: not the replays, not the originals

    code, output = run_replay(names.dlq, "--limit", "2")
    assert code == 0 and output.count(": replayed as ") == 2, output
    assert ready(names.dlq) == 3 and ready(names.queue) == 2
    code, output = run_replay(names.dlq, "--dry-run")  # the replays done are not listed again
    assert code == 0 and "3 of 3 would be replayed" in output, output


def test_a_copy_without_x_death_stays_unless_a_queue_is_named(dead_letters, amqp, fresh_publisher):
    names = dead_letters
    amqp.queue_declare(queue=names.other, durable=True)
    amqp.basic_publish(exchange="", routing_key=names.dlq, body=b"lost",
                       properties=pika.BasicProperties(message_id="no-death", delivery_mode=2))

    code, output = run_replay(names.dlq)
    assert code == 3, output  # left in the dead-letter queue, and said so
    assert "'no-death' -> '(no target)': skipped" in output
    assert ready(names.dlq) == 1
    assert not Message.objects.filter(origin=Message.Origin.REPLAY).exists()

    code, output = run_replay(names.dlq, "--to-queue", names.other)
    assert code == 0, output
    assert ready(names.dlq) == 0 and ready(names.other) == 1
    replayed = Message.objects.get(origin=Message.Origin.REPLAY)
    assert (replayed.routing_key, replayed.republished_from.message_id) == (names.other, "no-death")


def test_a_replay_sends_the_producers_headers_and_properties_as_they_came(dead_letters, amqp, fresh_publisher):
    names = dead_letters
    amqp.basic_publish(exchange="", routing_key=names.queue, body=b"\x00body\xff",
                       properties=pika.BasicProperties(message_id="odd", headers=HEADERS, **PROPERTIES))
    reject_all(names.queue, 1)
    wait_for(lambda: ready(names.dlq) == 1, message="the letter dead-lettered")

    code, output = run_replay(names.dlq)
    assert code == 0, output
    method, properties, body = amqp.basic_get(names.queue, auto_ack=True)
    assert method is not None and body == b"\x00body\xff"
    assert properties.message_id.startswith("odd~replay:")
    assert same(properties.headers, HEADERS), properties.headers  # no x-death, x-first-death-* or x-last-death-*
    for name in PROPERTIES:
        if name != "expiration":  # RabbitMQ removes it from a dead-lettered message (x-death keeps it)
            assert same(getattr(properties, name), PROPERTIES[name]), name


def test_a_missing_queue_and_bad_options_are_clear_errors(manage):
    missing = manage("replay", f"replay-missing-{uuid.uuid4().hex[:8]}")
    assert missing.wait(timeout=30) == 1
    assert "there is no queue" in missing.output and "Traceback" not in missing.output
    code, output = run_replay("q", "--rate", "0")
    assert code == 1 and "invalid positive_float value" in output  # exits 2 from the command line


def test_a_broker_that_does_not_answer_is_a_clear_error(settings, fresh_publisher, client):
    settings.RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens there
    code, output = run_replay("replay-anything")
    assert code == 1 and "the broker connection failed" in output and "guest:guest" not in output, output
    client.force_login(member("pat", "add_message", "view_message"))
    page = client.get(replay_url("replay-anything"))
    assert page.status_code == 503 and "Cannot read the queue now" in page.content.decode()


# --- the page ---------------------------------------------------------------------------------
def member(name: str, *codenames: str) -> User:
    user = User.objects.create_user(name, password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def test_the_page_confirms_escaped_then_replays_for_publishers_only(dead_letters, fresh_publisher):
    names = dead_letters
    hostile = f"<script>alert({uuid.uuid4().hex[:6]})</script>"
    publish(names.queue, 1, prefix=hostile)
    publish(names.queue, 2, prefix=names.queue)
    reject_all(names.queue, 3)
    wait_for(lambda: queue_depth(names.dlq)[0] == 3, message="3 letters dead-lettered")
    url = replay_url(names.dlq)

    assert Client().get(url).status_code == 302  # to the login page
    auditor = Client(enforce_csrf_checks=True)
    auditor.force_login(member("audrey", "view_message", "view_delivery"))
    assert auditor.get(url).status_code == 403
    assert auditor.post(url).status_code == 403
    assert ready(names.dlq) == 3

    publisher = Client(enforce_csrf_checks=True)
    pat = member("pat", "add_message", "view_message")
    publisher.force_login(pat)
    page = publisher.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    assert html.count(f"<code>{names.queue}</code>") == 3  # where each goes
    assert ready(names.dlq) == 3  # the confirmation takes nothing
    assert publisher.post(url).status_code == 403  # no CSRF token
    assert ready(names.dlq) == 3

    token = page.cookies["csrftoken"].value
    done = publisher.post(url, {"csrfmiddlewaretoken": token})
    assert done.status_code == 302 and done.url == url
    assert ready(names.dlq) == 0 and ready(names.queue) == 3
    replays = Message.objects.filter(origin=Message.Origin.REPLAY)
    assert replays.count() == 3 and {r.published_by_id for r in replays} == {pat.pk}
    assert "3 replayed" in publisher.get(url).content.decode()  # the report, then an empty queue

    assert publisher.get(replay_url(f"replay-missing-{uuid.uuid4().hex[:8]}")).status_code == 404
