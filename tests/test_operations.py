"""`/healthz` (database and broker) and `/metrics` (Prometheus, read from the database at scrape time)."""
from __future__ import annotations

import subprocess
import threading
import time
from http import HTTPStatus

import pytest
from django.core.cache import cache
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from messaging.models import Delivery, Message, Worker
from tests.audit_data import delivery, fast_passwords, letter  # noqa: F401 — autouse
from tests.conftest import management_url, rabbitmqctl_command, wait_for

pytestmark = pytest.mark.django_db

MANAGEMENT_URL = management_url()



def samples(response) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_healthz_ok(client):
    response = client.get(reverse("healthz"))
    assert response.status_code == HTTPStatus.OK
    assert response.json() == {"database": "ok", "broker": "ok"}
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_healthz_reports_the_broker_down(client, monkeypatch, settings):
    settings.RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens there
    response = client.get(reverse("healthz"))
    assert response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
    assert response.json() == {"database": "ok", "broker": "unavailable"}
    assert "guest" not in response.content.decode()


@pytest.mark.node
def test_healthz_turns_503_when_the_broker_is_stopped(client):
    try:
        subprocess.run(rabbitmqctl_command("stop_app"), check=True, capture_output=True, timeout=60)
        # within the few seconds a check is reused for (HEALTH_BROKER_REUSE_SECONDS)
        response = wait_for(lambda: (r := client.get(reverse("healthz"))).status_code != HTTPStatus.OK and r,
                            timeout=10, message="/healthz to answer 503")
        assert response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
        assert response.json()["broker"] == "unavailable"
    finally:
        subprocess.run(rabbitmqctl_command("start_app"), check=True, capture_output=True, timeout=120)
        subprocess.run(rabbitmqctl_command("await_startup"), check=True, capture_output=True, timeout=120)
    wait_for(lambda: client.get(reverse("healthz")).status_code == HTTPStatus.OK, timeout=10,
             message="/healthz to answer 200 again")


@pytest.fixture
def logins(monkeypatch):
    """The broker logins /healthz makes (each one still made): a list that grows by one per login."""
    from messaging.web import health

    made = []
    real_connect = health.connect

    def counting_connect(*args, **kwargs):
        made.append(1)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(health, "connect", counting_connect)
    return made


def test_healthz_shares_one_broker_check_among_requests_for_a_moment(client, monkeypatch, logins):
    from messaging.web import health

    monkeypatch.setattr(health, "HEALTH_BROKER_REUSE_SECONDS", 60.0)  # however slow this machine
    assert all(client.get(reverse("healthz")).status_code == HTTPStatus.OK for _ in range(20))
    assert len(logins) == 1
    # Once the moment has passed, the next request checks again.
    monkeypatch.setattr(health, "HEALTH_BROKER_REUSE_SECONDS", 0.3)
    cache.clear()
    assert client.get(reverse("healthz")).status_code == HTTPStatus.OK and len(logins) == 2
    time.sleep(0.5)
    assert client.get(reverse("healthz")).status_code == HTTPStatus.OK and len(logins) == 3


def test_requests_during_the_first_broker_check_wait_for_its_answer(monkeypatch, logins):
    """Concurrent requests make one login between them, and each gets its answer."""
    from messaging.web import health

    real_answers = health._broker_answers

    def slow_answers():
        time.sleep(0.5)  # long enough for every thread to arrive while the check runs
        return real_answers()

    monkeypatch.setattr(health, "_broker_answers", slow_answers)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(health.check_broker())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert answers == [True] * 8
    assert len(logins) == 1


def test_metrics_need_the_token_or_staff(client, settings, django_user_model):
    settings.MAILROOM_METRICS_TOKEN = ""
    assert client.get(reverse("metrics")).status_code == HTTPStatus.FORBIDDEN
    user = django_user_model.objects.create_user("plain")
    client.force_login(user)
    assert client.get(reverse("metrics")).status_code == HTTPStatus.FORBIDDEN
    user.is_staff = True
    user.save()
    assert client.get(reverse("metrics")).status_code == HTTPStatus.OK
    client.logout()
    settings.MAILROOM_METRICS_TOKEN = "s3cret-token"
    assert client.get(reverse("metrics"), HTTP_AUTHORIZATION="Bearer wrong").status_code == HTTPStatus.FORBIDDEN
    assert client.get(reverse("metrics"), HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == HTTPStatus.OK


def test_metrics_read_the_database_at_scrape_time(client, settings, queue_name, amqp):
    settings.MAILROOM_METRICS_TOKEN = "t"
    settings.RABBITMQ_MANAGEMENT_URL = MANAGEMENT_URL
    amqp.queue_declare(queue=queue_name, durable=True)
    before = samples(client.get(reverse("metrics"), HTTP_AUTHORIZATION="Bearer t"))
    published = before.get(("mailroom_letters", (("status", "published"),)), 0)
    m = letter()
    letter(status=Message.Status.FAILED, published_at=None)
    delivery(m, status=Delivery.Status.REJECTED)
    Worker.objects.create(host="metrics-host", pid=4242, queues=[queue_name])
    response = client.get(reverse("metrics"), HTTP_AUTHORIZATION="Bearer t")
    assert response["Content-Type"].startswith("text/plain")
    after = samples(response)
    assert after[("mailroom_letters", (("status", "published"),))] == published + 1
    assert after[("mailroom_letters", (("status", "failed"),))] >= 1
    assert after[("mailroom_deliveries", (("status", "rejected"),))] >= 1
    assert after[("mailroom_workers_alive", ())] >= 1
    assert ("mailroom_worker_heartbeat_timestamp_seconds", (("host", "metrics-host"), ("pid", "4242"))) in after
    assert after[("mailroom_management_api_up", ())] == 1
    assert after[("mailroom_queue_messages_ready", (("queue", queue_name),))] == 0
