"""The broker view at /queues/: from the management API, or from passive declares without it."""
from __future__ import annotations

import time
from http import HTTPStatus

import pytest
from django.core.cache import cache
from django.urls import reverse

from messaging.models import Worker
from tests.audit_data import delivery, fast_passwords, letter  # noqa: F401 — autouse
from tests.conftest import management_url

pytestmark = pytest.mark.django_db

MANAGEMENT_URL = management_url()



@pytest.fixture
def two_ready(queue_name, amqp):
    amqp.queue_declare(queue=queue_name, durable=True)
    for body in (b"1", b"2"):
        amqp.basic_publish("", queue_name, body)
    m = letter(routing_key=queue_name)
    delivery(m, queue=queue_name)
    return queue_name


def test_passive_declares_without_the_management_api(admin_client, settings, two_ready):
    settings.RABBITMQ_MANAGEMENT_URL = ""
    Worker.objects.create(host="h", pid=1, queues=["queue-that-is-not-there-x"])
    response = admin_client.get(reverse("queues"))
    assert response.status_code == HTTPStatus.OK
    view = response.context["view"]
    assert view.source == "passive" and view.exchanges is None
    rows = {q.name: q for q in view.queues}
    assert rows[two_ready].ready == 2 and rows[two_ready].consumers == 0
    assert rows["queue-that-is-not-there-x"].missing
    assert "does not exist" in response.content.decode()


def test_management_api_shows_rates_bindings_and_alarms(admin_client, settings, two_ready, amqp):
    settings.RABBITMQ_MANAGEMENT_URL = MANAGEMENT_URL
    exchange = f"x-{two_ready}"
    amqp.exchange_declare(exchange=exchange, exchange_type="direct", auto_delete=True)
    amqp.queue_bind(queue=two_ready, exchange=exchange, routing_key="rk-view")
    try:
        response = admin_client.get(reverse("queues"))
        assert response.status_code == HTTPStatus.OK
        view = response.context["view"]
        assert view.source == "management" and view.alarms == []
        row = next(q for q in view.queues if q.name == two_ready)
        assert row.kind == "classic"
        assert row.consumers in (0, None)  # the API's figures for a new queue appear after a few seconds
        bound = next(e for e in view.exchanges if e.name == exchange)
        assert {"destination": two_ready, "destination_type": "queue", "routing_key": "rk-view",
                "arguments": {}} in bound.bindings
        html = response.content.decode()
        assert exchange in html and "rk-view" in html and "Alarms: none" in html
    finally:
        amqp.exchange_delete(exchange)


def test_an_unreachable_management_api_falls_back(admin_client, settings, two_ready):
    settings.RABBITMQ_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:1/"
    response = admin_client.get(reverse("queues"))
    view = response.context["view"]
    assert view.source == "passive" and "did not answer" in view.error
    assert "guest:guest" not in response.content.decode()
    assert any(q.name == two_ready and q.ready == 2 for q in view.queues)


def test_anonymous_is_sent_to_log_in(client):
    response = client.get(reverse("queues"))
    assert response.status_code == HTTPStatus.FOUND and "login" in response["Location"]


def test_the_alarm_banner_asks_the_management_api_once_for_a_few_seconds(admin_client, settings, monkeypatch):
    from messaging.amqp import management
    from messaging.web import cluster

    asked = []

    def nodes():
        asked.append(1)
        return [{"name": "rabbit@test", "running": True, "disk_free_alarm": True}]

    monkeypatch.setattr(management, "nodes", nodes)
    settings.RABBITMQ_MANAGEMENT_URL = MANAGEMENT_URL
    monkeypatch.setattr(cluster, "NODES_CACHE_SECONDS", 60.0)  # however slow this machine
    pages = [admin_client.get(reverse("message-list")).content.decode() for _ in range(5)]
    assert all("blocking publishers" in page for page in pages)
    assert len(asked) == 1
    settings.RABBITMQ_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:1/"  # another broker: asked anew
    assert "blocking publishers" in admin_client.get(reverse("message-list")).content.decode() and len(asked) == 2
    monkeypatch.setattr(cluster, "NODES_CACHE_SECONDS", 0.3)
    cache.clear()
    admin_client.get(reverse("message-list"))
    time.sleep(0.5)
    admin_client.get(reverse("message-list"))
    assert len(asked) == 4  # asked again once the few seconds had passed
