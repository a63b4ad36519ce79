"""Every audit page runs a bounded number of queries, whatever the size of the history.

The history here is a few thousand rows (CI); bench/scale.py times the same pages at a million.
"""
from __future__ import annotations

import re
from http import HTTPStatus

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from messaging.models import Delivery, Message
from messaging.web.counting import RECENT_DELIVERIES
from messaging.web.display import PREVIEW_BYTES
from messaging.web.views import PAGE_SIZE
from tests.audit_data import fast_passwords, seed  # noqa: F401 — autouse

LETTERS = 3000


@pytest.fixture(scope="module")
def history(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        seed(LETTERS, queues=("qc-a", "qc-b"))
        yield
        Delivery.objects.filter(queue__in=["qc-a", "qc-b"]).delete()
        Message.objects.filter(message_id__startswith="seed-").delete()


@pytest.fixture
def staff(history, db):
    user = User.objects.create_superuser("counter")
    client = Client()
    client.force_login(user)
    return client


def letter_of(index: int) -> Message:
    return Message.objects.order_by("created_at", "id").exclude(status="failed")[index]


def pages() -> list[tuple[str, int]]:
    """(url, most queries allowed)."""
    m = letter_of(100)
    admin_list = reverse("admin:messaging_message_changelist")
    delivery_list = reverse("admin:messaging_delivery_changelist")
    return [
        (admin_list, 10),
        (admin_list + "?status=failed", 10),
        (admin_list + "?origin=api", 10),
        (admin_list + "?exchange=audit.x", 10),
        (admin_list + "?queue=qc-a", 10),
        (admin_list + "?delivery_status=rejected", 10),
        (admin_list + f"?q={m.message_id}", 10),
        (admin_list + f"?q={m.correlation_id}", 10),
        (admin_list + f"?created_at__year={m.created_at.year}&created_at__month={m.created_at.month}", 10),
        (admin_list + "?p=3", 10),
        (admin_list + "?_facets=True&status=published", 10),
        (reverse("admin:messaging_message_change", args=[m.pk]), 10),
        (delivery_list, 10),
        (delivery_list + "?status=rejected", 10),
        (delivery_list + "?queue=qc-b", 10),
        (delivery_list + f"?q={m.message_id}", 10),
        (delivery_list + "?death_reason=any", 10),
        (delivery_list + "?death_reason=expired&dead_lettered_from=qc-a", 10),
        (reverse("admin:messaging_delivery_change", args=[m.deliveries.first().pk]), 8),
        # The list's one extra query: the latest delivery and a body preview of the page's letters.
        (reverse("message-list"), 7),
        (reverse("message-list") + "?status=failed", 7),
        (reverse("message-list") + "?queue=qc-a", 9),
        (reverse("message-list") + f"?q={m.message_id}", 7),
        (reverse("message-list") + "?page=5", 7),
        (reverse("message-detail", args=[m.message_id]), 6),
        (reverse("dashboard"), 22),
        (reverse("queues"), 6),
        (reverse("dead-letters"), 6),  # without the management API: says so
    ]


@pytest.mark.django_db
def test_pages_use_a_bounded_number_of_queries(staff, django_assert_max_num_queries, settings):
    settings.RABBITMQ_MANAGEMENT_URL = ""
    for url, most in pages():
        with django_assert_max_num_queries(most, info=url):
            response = staff.get(url)
        assert response.status_code == HTTPStatus.OK, url


@pytest.mark.django_db
def test_the_lists_show_the_seeded_history(staff):
    assert "Show counts" not in staff.get(reverse("admin:messaging_message_changelist")).content.decode()
    html = staff.get(reverse("admin:messaging_message_changelist")).content.decode()
    assert 'class="field-deliveries">2<' in html
    page = staff.get(reverse("admin:messaging_message_changelist") + "?delivery_status=rejected").content.decode()
    assert "seed-" in page
    # A queue's letters: those of its latest RECENT_DELIVERIES deliveries and the latest sent to it directly.
    page = staff.get(reverse("message-list") + "?queue=qc-a").context["page"]
    assert RECENT_DELIVERIES <= page.paginator.count <= 2 * RECENT_DELIVERIES
    newest = Message.objects.filter(deliveries__queue="qc-a").order_by("-created_at", "-id").first()
    assert page.object_list[0].message_id == newest.message_id


@pytest.mark.django_db
def test_the_letter_list_reads_delivery_states_and_previews_in_one_query_for_the_page(staff):
    for url in (reverse("message-list"), reverse("message-list") + "?page=3", reverse("message-list") + "?status=failed"):
        with CaptureQueriesContext(connection) as queries:
            response = staff.get(url)
        rows = response.context["rows"]
        assert len(rows) == len(response.context["page"].object_list) > 0, url
        on_deliveries = [q["sql"] for q in queries.captured_queries if "messaging_delivery" in q["sql"]]
        assert len(on_deliveries) == 1, (url, on_deliveries)  # not one per letter
        sql = on_deliveries[0]
        # Only the page's letters, and only the first bytes of their bodies.
        assert " IN (" in sql and sql.count(",") < 3 * PAGE_SIZE and "LIMIT 1" in sql, sql
        assert f"1, {PREVIEW_BYTES})" in sql, sql
        whole_body = [q["sql"] for q in queries.captured_queries
                      if '"messaging_message"."body"' in re.sub(r'SUBSTR(ING)?\("messaging_message"\."body", 1, \d+\)',
                                                                "", q["sql"])]
        assert whole_body == [], url
    html = staff.get(reverse("message-list")).content.decode()
    assert 'data-delivery="acked"' in html and "letter 2999" in html
    failed = staff.get(reverse("message-list") + "?status=failed")
    assert {row["delivery"] for row in failed.context["rows"]} == {""}
    assert "not delivered" in failed.content.decode()
