"""The dashboard: counts by status, the SVG traffic chart, workers, failures and undelivered letters."""
from __future__ import annotations

from datetime import timedelta
from http import HTTPStatus

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from messaging.models import Delivery, Message, Worker
from messaging.web import dashboard
from messaging.web.counting import capped_count
from tests.audit_data import delivery, fast_passwords, letter  # noqa: F401 — autouse

pytestmark = pytest.mark.django_db


def test_dashboard_shows_counts_chart_workers_and_failures(admin_client):
    now = timezone.now()
    for minutes_ago in (1, 1, 2, 30):
        m = letter(published_at=now - timedelta(minutes=minutes_ago))
        delivery(m, received_at=now - timedelta(minutes=minutes_ago))
    failed = letter(status=Message.Status.FAILED, published_at=None, last_error="exchange not found")
    rejected = letter()
    delivery(rejected, status=Delivery.Status.REJECTED, error="Traceback\nValueError: poison")
    Worker.objects.create(host="dash-host", pid=77, queues=["dash-q"])
    Worker.objects.create(host="dead-host", pid=78, queues=["dash-q"], heartbeat_at=now - timedelta(minutes=5))

    response = admin_client.get(reverse("dashboard"))
    assert response.status_code == HTTPStatus.OK
    html = response.content.decode()
    counts = {value: str(n) for value, _, n in response.context["message_counts"]}
    assert counts["published"] == "5" and counts["failed"] == "1" and counts["pending"] == "0"
    assert f'href="{reverse("message-list")}?status=published"' in html  # the counts are on the page
    deliveries = {value: str(n) for value, _, n in response.context["delivery_counts"]}
    assert deliveries["acked"] == "4" and deliveries["rejected"] == "1"
    # The chart is inline SVG drawn on the server: two polylines of 60 points, no script.
    assert "<svg" in html and html.count("<polyline") == 2 and "<script" not in html
    chart = response.context["chart"]
    assert len(chart.published.split()) == 60 and chart.published_total == 5 and chart.consumed_total == 5
    assert chart.peak == 2
    assert "dash-host:77" in html and "dead-host" not in html
    assert failed.message_id in html and "exchange not found" in html
    assert rejected.message_id in html and "ValueError: poison" in html
    assert reverse("message-detail", args=[failed.message_id]) in html


def test_undelivered_letters_are_listed():
    stale = letter(published_at=timezone.now() - timedelta(minutes=20))
    fresh = letter(published_at=timezone.now() - timedelta(minutes=1))
    delivered = letter(published_at=timezone.now() - timedelta(minutes=20))
    delivery(delivered)
    listed = {m.message_id for m in dashboard.summary()["undelivered"]}
    assert stale.message_id in listed and fresh.message_id not in listed and delivered.message_id not in listed


def test_capped_count_is_exact_below_the_cap():
    for _ in range(3):
        letter()
    count = capped_count(Message.objects.all(), cap=2)
    assert count.value >= 3
    assert capped_count(Message.objects.all(), cap=10).value == 3
    assert str(capped_count(Message.objects.all(), cap=10)) == "3"


def test_the_estimate_note_shows_only_where_a_count_is_estimated(admin_client, monkeypatch):
    """SQLite counts exactly; PostgreSQL estimates past the cap (here a cap of 2, for 3 letters)."""
    for _ in range(3):
        letter()
    assert "estimate-note" not in admin_client.get(reverse("dashboard")).content.decode()  # below the cap
    monkeypatch.setattr(dashboard, "capped_count", lambda queryset: capped_count(queryset, cap=2))
    html = admin_client.get(reverse("dashboard")).content.decode()
    assert ("estimate-note" in html) is (connection.vendor == "postgresql")
    assert ("PostgreSQL's planner" in html) is (connection.vendor == "postgresql")


def test_times_show_seconds_and_the_active_time_zone(admin_client):
    from django.utils import timezone as tz

    m = letter(status=Message.Status.FAILED, published_at=None, last_error="nope",
               created_at=timezone.now().replace(hour=10, minute=41, second=5))
    html = admin_client.get(reverse("dashboard")).content.decode()
    assert f"{m.created_at:%Y-%m-%d} 10:41:05 UTC" in html
    with tz.override("Europe/Paris"):
        html = admin_client.get(reverse("message-list")).content.decode()
    assert "11:41:05 CET" in html or "12:41:05 CEST" in html
