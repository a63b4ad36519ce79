"""The RabbitMQ tutorial's own code (tests/tutorial/, from ../shared/seed/) works beside Mailroom, unmodified.

Each test has a vhost of its own, so the tutorial's literal names (`hello`, `logs`) never meet
another test's or a `make run` beside it; deleting the vhost deletes what was declared in it.
"""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pika
import pytest

from messaging.models import Delivery
from tests.conftest import (
    rabbitmq_url,
    rabbitmq_url_with,
    rabbitmqctl,
    subprocess_env,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)

TUTORIAL = Path(__file__).resolve().parent / "tutorial"
NOT_SURVIVING = "does not survive a broker restart"


@pytest.fixture
def vhost_url():
    """RABBITMQ_URL on a vhost of this test's own (the tests' user may use it); deleted afterwards."""
    name = f"mailroom-tutorial-{uuid.uuid4().hex[:8]}"
    user = unquote(urlsplit(rabbitmq_url()).username or "guest")
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield rabbitmq_url_with(vhost=name)
    finally:
        rabbitmqctl("delete_vhost", name)


def run_tutorial(script: str, url: str) -> None:
    """Run tests/tutorial/SCRIPT as the tutorial runs it (`python send.py`), against `url`; it must not fail."""
    done = subprocess.run([sys.executable, str(TUTORIAL / "run.py"), script], check=False,
                          env=subprocess_env(RABBITMQ_URL=url),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr}"


def recorded(body: bytes, **filters) -> list[Delivery]:
    """The acked deliveries of letters with this body (a Message and its acked Delivery)."""
    deliveries = Delivery.objects.filter(status=Delivery.Status.ACKED, **filters).select_related("message")
    return [d for d in deliveries if bytes(d.message.body) == body]


@pytest.mark.parametrize("mailroom_first", [True, False], ids=["mailroom-first", "tutorial-first"])
def test_send_py_beside_consume_hello(manage, vhost_url, mailroom_first):
    consume = ["consume", "hello"]
    env = subprocess_env(RABBITMQ_URL=vhost_url)
    if mailroom_first:
        worker = manage(*consume, env=env)
        wait_for(lambda: "consuming queues=hello" in worker.output, timeout=30, message="the worker to consume")
        run_tutorial("send.py", vhost_url)
    else:
        run_tutorial("send.py", vhost_url)  # the letter waits in the tutorial's queue
        worker = manage(*consume, env=env)
    wait_for(lambda: recorded(b"Hello World!", queue="hello"), timeout=30, message="the letter recorded and acked")
    run_tutorial("send.py", vhost_url)  # and again, with both sides' declarations made
    wait_for(lambda: len(recorded(b"Hello World!", queue="hello")) == 2, timeout=30, message="the second letter")
    assert worker.proc.poll() is None, worker.output
    # The same declaration on both sides: neither had to give way to the other's queue.
    assert "exists with other arguments" not in worker.output
    assert worker.output.count(NOT_SURVIVING) == 1, worker.output


@pytest.mark.parametrize("mailroom_first", [True, False], ids=["mailroom-first", "tutorial-first"])
def test_emit_log_py_beside_consume_exchange_logs(manage, vhost_url, mailroom_first):
    consume = ["consume", "--exchange", "logs", "--exchange-type", "fanout"]
    env = subprocess_env(RABBITMQ_URL=vhost_url)
    if not mailroom_first:
        run_tutorial("emit_log.py", vhost_url)  # no queue bound yet: dropped, as in the tutorial
        run_tutorial("send.py", vhost_url)  # it declares `logs` too
    worker = manage(*consume, env=env)
    wait_for(lambda: "consuming queues=(server-named)" in worker.output, timeout=30, message="the worker to consume")
    run_tutorial("emit_log.py", vhost_url)
    run_tutorial("send.py", vhost_url)
    wait_for(lambda: recorded(b"info: Hello World!", message__exchange="logs"), timeout=30,
             message="the log line recorded and acked")
    assert worker.proc.poll() is None, worker.output
    assert "exists with other arguments" not in worker.output
    assert worker.output.count(NOT_SURVIVING) == 1, worker.output  # its exclusive, server-named queue


def test_durable_is_asked_for_explicitly(manage, vhost_url):
    """Production's `--durable`: the queue and exchange survive a restart, and nothing warns."""
    queue, exchange = f"t-durable-{uuid.uuid4().hex[:8]}", f"t-durable-x-{uuid.uuid4().hex[:8]}"
    worker = manage("consume", queue, "--durable", "--exchange", exchange, "--exchange-type", "fanout",
                    env=subprocess_env(RABBITMQ_URL=vhost_url))
    wait_for(lambda: f"consuming queues={queue}" in worker.output, timeout=30, message="the worker to consume")
    assert NOT_SURVIVING not in worker.output
    connection = pika.BlockingConnection(pika.URLParameters(vhost_url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue=queue, durable=True)  # a 406 if it had been declared otherwise
        channel.exchange_declare(exchange=exchange, exchange_type="fanout", durable=True)
    finally:
        connection.close()
