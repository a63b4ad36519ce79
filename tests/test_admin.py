"""The admin as an audit tool: both roles, read-only history, search, filters, exports, republish."""
from __future__ import annotations

import csv
import io
import json
from http import HTTPStatus

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.urls import reverse

from messaging.models import Delivery, Message
from tests.audit_data import delivery, fast_passwords, letter  # noqa: F401 — autouse

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:messaging_message_changelist"


def member(role: str) -> User:
    user = User.objects.create_user(f"{role}-user", password="x", is_staff=True)
    user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def auditor(client):
    client.force_login(member("auditor"))
    return client


@pytest.fixture
def publisher(client):
    client.force_login(member("publisher"))
    return client


@pytest.fixture
def trail():
    m = letter(message_id="find-me", routing_key="orders", correlation_id="corr-1", headers={"k": "v"},
               body=b"\xff\x00binary")
    delivery(m, queue="orders", status=Delivery.Status.REQUEUED, attempt=1, error="boom")
    delivery(m, queue="orders", status=Delivery.Status.ACKED, attempt=2, redelivered=True)
    letter(message_id="unrelated-letter", routing_key="elsewhere")
    return m


def test_roles_have_exactly_their_permissions():
    perms = {g.name: {p.codename for p in g.permissions.all()} for g in Group.objects.all()}
    assert "add_message" in perms["publisher"] and "view_delivery" in perms["publisher"]
    assert all(p.startswith("view_") for p in perms["auditor"])
    assert {"view_message", "view_delivery", "view_worker"} <= perms["auditor"]


def test_roles_command_recreates_and_grants(capsys):
    Group.objects.filter(name="auditor").delete()
    User.objects.create_user("carol")
    call_command("roles", "--grant", "carol", "auditor")
    carol = User.objects.get(username="carol")
    assert carol.is_staff and carol.groups.filter(name="auditor").exists()
    assert carol.has_perm("messaging.view_delivery") and not carol.has_perm("messaging.add_message")


def test_auditor_finds_a_letter_by_message_id_and_sees_its_trail(auditor, trail):
    listing = auditor.get(reverse(CHANGELIST), {"q": "find-me"})
    assert listing.status_code == HTTPStatus.OK
    html = listing.content.decode()
    assert "find-me" in html and "unrelated-letter" not in html
    change_url = reverse("admin:messaging_message_change", args=[trail.pk])
    assert change_url in html  # one click from the result to the trail
    page = auditor.get(change_url).content.decode()
    assert "requeued" in page and "acked" in page and "boom" in page
    assert "Save" not in page  # read-only: no form to change it
    for term in ("corr-1", "orders"):  # correlation_id and routing key search too
        assert "find-me" in auditor.get(reverse(CHANGELIST), {"q": term}).content.decode()


def test_auditor_changes_and_publishes_nothing(auditor, trail):
    change_url = reverse("admin:messaging_message_change", args=[trail.pk])
    response = auditor.post(change_url, {"routing_key": "hacked"})
    assert response.status_code == HTTPStatus.FORBIDDEN
    assert auditor.get(reverse("admin:messaging_message_add")).status_code == HTTPStatus.FORBIDDEN
    assert auditor.get(reverse("admin:messaging_message_delete", args=[trail.pk])).status_code == HTTPStatus.FORBIDDEN
    assert auditor.get(reverse("publish")).status_code == HTTPStatus.FORBIDDEN
    before = Message.objects.count()
    response = auditor.post(reverse(CHANGELIST), {"action": "republish_messages", "_selected_action": [trail.pk],
                                                  "confirmed": "yes"})
    assert Message.objects.count() == before
    trail.refresh_from_db()
    assert trail.routing_key == "orders"
    listing = auditor.get(reverse(CHANGELIST)).content.decode()
    assert "republish_messages" not in listing and "export_csv" in listing
    assert auditor.get(reverse("admin:messaging_delivery_changelist")).status_code == HTTPStatus.OK
    assert auditor.get(reverse("admin:messaging_worker_changelist")).status_code == HTTPStatus.OK


def test_publisher_sees_history_and_may_republish(publisher, trail, queue_name, amqp,
                                                  django_capture_on_commit_callbacks):
    amqp.queue_declare(queue=queue_name, durable=True)
    Message.objects.filter(pk=trail.pk).update(routing_key=queue_name)
    listing = publisher.get(reverse(CHANGELIST)).content.decode()
    assert "republish_messages" in listing
    data = {"action": "republish_messages", "_selected_action": [trail.pk]}
    confirm = publisher.post(reverse(CHANGELIST), data)
    assert confirm.status_code == HTTPStatus.OK and "Yes, republish" in confirm.content.decode()
    # The confirmation posts the same action and selection back.
    assert f'name="_selected_action" value="{trail.pk}"' in confirm.content.decode()
    assert 'name="action" value="republish_messages"' in confirm.content.decode()
    assert Message.objects.filter(republished_from=trail).count() == 0  # nothing until confirmed
    with django_capture_on_commit_callbacks(execute=True):  # the publish happens on commit
        done = publisher.post(reverse(CHANGELIST), {**data, "confirmed": "yes"})
    assert done.status_code == HTTPStatus.FOUND
    copy = Message.objects.get(republished_from=trail)
    assert copy.status == Message.Status.PUBLISHED and copy.origin == Message.Origin.REPUBLISH
    assert bytes(copy.body) == b"\xff\x00binary" and copy.published_by.username == "publisher-user"
    assert copy.message_id != trail.message_id
    method, _, body = amqp.basic_get(queue_name, auto_ack=True)
    assert body == b"\xff\x00binary"
    # The copy's page links back to the original.
    page = publisher.get(reverse("admin:messaging_message_change", args=[copy.pk])).content.decode()
    assert reverse("admin:messaging_message_change", args=[trail.pk]) in page
    # But still cannot change a letter.
    assert publisher.post(reverse("admin:messaging_message_change", args=[trail.pk]), {}).status_code == 403


def test_republish_reports_a_letter_it_cannot_copy_and_copies_the_others(publisher, queue_name, amqp, settings,
                                                                         django_capture_on_commit_callbacks):
    """Another producer's letter may be over MAILROOM_MAX_BODY_BYTES: refused with its reason, no 500."""
    amqp.queue_declare(queue=queue_name, durable=True)
    settings.MAILROOM_MAX_BODY_BYTES = 10
    big = letter(message_id="too-big", routing_key=queue_name, body=b"x" * 11)
    small = letter(message_id="small", routing_key=queue_name, body=b"x")
    data = {"action": "republish_messages", "_selected_action": [big.pk, small.pk], "confirmed": "yes"}
    with django_capture_on_commit_callbacks(execute=True):
        done = publisher.post(reverse(CHANGELIST), data, follow=True)
    assert done.status_code == HTTPStatus.OK
    page = done.content.decode()
    assert "Not republished: too-big: The body is 11 bytes; the limit is 10 bytes." in page
    assert "Republished 1 letter(s)" in page
    copy = Message.objects.get(republished_from__isnull=False)
    assert copy.republished_from == small and copy.status == Message.Status.PUBLISHED


def test_list_columns_and_filters(admin_client, trail):
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "last delivery" in html.lower() and 'class="field-deliveries">2<' in html
    assert 'class="field-last_delivery">acked<' in html
    for params, expect, absent in [
        ({"status": "published"}, "find-me", None),
        ({"queue": "orders"}, "find-me", "unrelated-letter"),
        ({"delivery_status": "requeued"}, "find-me", "unrelated-letter"),
        ({"exchange": "-"}, "find-me", None),
        ({"exchange": "nope"}, None, "find-me"),
        ({"origin": "external"}, None, "find-me"),
    ]:
        page = admin_client.get(reverse(CHANGELIST), params)
        assert page.status_code == HTTPStatus.OK, params
        text = page.content.decode()
        if expect:
            assert expect in text, params
        if absent:
            assert absent not in text, params
    by_year = admin_client.get(reverse(CHANGELIST), {"created_at__year": trail.created_at.year})
    assert by_year.status_code == HTTPStatus.OK and "find-me" in by_year.content.decode()
    deliveries = admin_client.get(reverse("admin:messaging_delivery_changelist"), {"q": "find-me"}).content.decode()
    assert deliveries.count("find-me") >= 2


def test_export_csv_and_json(admin_client, trail):
    selected = {"_selected_action": [trail.pk]}
    response = admin_client.post(reverse(CHANGELIST), {"action": "export_csv", **selected})
    assert response.status_code == HTTPStatus.OK and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 1
    row = rows[0]
    assert row["message_id"] == "find-me" and row["routing_key"] == "orders" and row["correlation_id"] == "corr-1"
    assert row["delivery_count"] == "2" and row["last_delivery_status"] == "acked"
    assert row["body_encoding"] == "base64" and json.loads(row["headers"]) == {"k": "v"}

    response = admin_client.post(reverse(CHANGELIST), {"action": "export_json", **selected})
    data = json.loads(b"".join(response.streaming_content))
    assert [d["message_id"] for d in data] == ["find-me"]
    assert [d["status"] for d in data[0]["deliveries"]] == ["requeued", "acked"]
    assert data[0]["deliveries"][1]["redelivered"] is True and data[0]["headers"] == {"k": "v"}


def test_csv_export_defuses_formulas(admin_client):
    m = letter(routing_key="=HYPERLINK(\"http://evil\")")
    response = admin_client.post(reverse(CHANGELIST), {"action": "export_csv", "_selected_action": [m.pk]})
    row = next(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert row["routing_key"].startswith("'=")


def test_date_hierarchy_offers_the_periods_of_the_matching_letters(admin_client):
    from datetime import datetime
    from datetime import timezone as tz

    for when in (datetime(2024, 12, 30, tzinfo=tz.utc), datetime(2025, 2, 3, tzinfo=tz.utc)):
        letter(created_at=when)
    years = admin_client.get(reverse(CHANGELIST)).context["cl"]
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "created_at__year=2024" in html and "created_at__year=2025" in html
    months = admin_client.get(reverse(CHANGELIST), {"created_at__year": 2025}).content.decode()
    assert "created_at__month=2&" in months
    assert "created_at__month=12" not in months and "created_at__month=1&" not in months  # only 2025's
    assert years.result_count == 2


@pytest.mark.parametrize("url, params", [
    (CHANGELIST, {"exchange": "\x00"}),
    (CHANGELIST, {"queue": "\x00"}),
    (CHANGELIST, {"status__exact": "\x00"}),
    (CHANGELIST, {"q": "a\x00b"}),
    ("admin:messaging_delivery_changelist", {"queue": "\x00"}),
    ("admin:messaging_delivery_changelist", {"q": "\x00"}),
    ("admin:messaging_worker_changelist", {"host": "\x00"}),
    ("admin:messaging_apitoken_changelist", {"name": "\x00"}),
    ("admin:auth_user_changelist", {"q": "\x00"}),  # Django's own pages too
    ("admin:auth_group_changelist", {"q": "\x00"}),
    ("message-list", {"q": "\x00"}),
    ("message-list", {"queue\x00": "x"}),
])
def test_a_nul_in_a_query_parameter_is_a_clear_400_not_a_500(admin_client, trail, url, params):
    """No stored value holds a NUL and PostgreSQL refuses one in a query (a 500 before)."""
    response = admin_client.get(reverse(url), params)
    assert response.status_code == HTTPStatus.BAD_REQUEST, (params, response.status_code)
    assert b"NUL" in response.content
    assert admin_client.get(reverse(url)).status_code == HTTPStatus.OK  # the list itself still shows


@pytest.mark.parametrize("url, params", [
    (CHANGELIST, {"created_at__year": "9999"}),  # Django computed the year 10000: ValueError
    (CHANGELIST, {"created_at__year": "9999", "created_at__month": "12"}),  # OverflowError
    ("admin:messaging_delivery_changelist", {"received_at__year": "9999"}),
])
def test_a_date_past_the_calendar_is_djangos_bad_lookup_page_not_a_500(admin_client, trail, url, params):
    response = admin_client.get(reverse(url), params)
    assert response.status_code == HTTPStatus.FOUND and response["Location"].endswith("?e=1")


@pytest.mark.parametrize("url, action", [
    (CHANGELIST, "export_csv"), ("admin:messaging_apitoken_changelist", "delete_selected"),
])
def test_an_action_on_a_selection_that_is_not_ids_is_a_message_not_a_500(admin_client, trail, url, action):
    response = admin_client.post(reverse(url), {"action": action, "_selected_action": ["1", "abc"]})
    assert response.status_code == HTTPStatus.FOUND
    page = admin_client.get(response["Location"])
    assert b"The selection is not a list of rows of this page." in page.content


@pytest.mark.parametrize("action", ["export_csv", "export_json"])
def test_exports_read_each_letter_once(admin_client, django_assert_max_num_queries, action):
    """The list defers bodies and headers; an export reads them with the letters, not a query each."""
    pks = [letter(body=b"body", last_error="e").pk for _ in range(20)]
    with django_assert_max_num_queries(8, info=action):
        response = admin_client.post(reverse(CHANGELIST), {"action": action, "_selected_action": pks})
        content = b"".join(response.streaming_content).decode()  # the rows are read while streaming
    rows = list(csv.DictReader(io.StringIO(content))) if action == "export_csv" else json.loads(content)
    assert len(rows) == 20 and {(r["body"], r["last_error"]) for r in rows} == {("body", "e")}


def test_a_letter_delivered_again_and_again_shows_its_latest_deliveries(admin_client, monkeypatch):
    """Another producer may send one message_id again and again: the letter's page, its API answer
    and its admin page list the latest deliveries, not all of them (each polled every second)."""
    from messaging.web import views
    from messaging.web.admin.messages import DeliveryInline
    from messaging.web.api import views as api

    monkeypatch.setattr(views, "DELIVERIES_SHOWN", 3)
    monkeypatch.setattr(api, "API_DELIVERIES", 3)
    monkeypatch.setattr(DeliveryInline, "LATEST", 3)
    m = letter(message_id="again-and-again", routing_key="orders")
    for attempt in range(1, 6):
        delivery(m, queue="orders", status=Delivery.Status.ACKED, attempt=attempt, duplicate=attempt > 1)

    page = admin_client.get(reverse("message-detail", args=[m.message_id])).content.decode()
    assert page.count("data-delivery-status=") == 3 and "The latest 3 of 5 deliveries" in page
    assert "<td>3</td><td>orders</td><td>3 (duplicate)" in page  # the oldest shown, numbered as the third
    assert reverse("admin:messaging_delivery_changelist") + "?q=again-and-again" in page

    answer = admin_client.get(f"/api/messages/{m.message_id}/").json()
    assert [d["attempt"] for d in answer["deliveries"]] == [3, 4, 5] and answer["deliveries_truncated"]

    change = admin_client.get(reverse("admin:messaging_message_change", args=[m.pk])).content.decode()
    assert 'name="deliveries-TOTAL_FORMS" value="3"' in change


def test_times_show_seconds_and_zone_and_headers_are_indented_json(admin_client, trail):
    from datetime import datetime
    from datetime import timezone as tz

    Message.objects.filter(pk=trail.pk).update(created_at=datetime(2026, 12, 7, 10, 41, 5, tzinfo=tz.utc))
    Delivery.objects.filter(message=trail).update(received_at=datetime(2026, 12, 7, 10, 41, 6, tzinfo=tz.utc))
    listing = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert 'class="field-created">2026-12-07 10:41:05 UTC<' in listing
    assert 'class="field-last_delivered">2026-12-07 10:41:06 UTC<' in listing
    deliveries = admin_client.get(reverse("admin:messaging_delivery_changelist")).content.decode()
    assert "2026-12-07 10:41:06 UTC" in deliveries and "admin.css" in deliveries and 'rel="icon"' in deliveries
    page = admin_client.get(reverse("admin:messaging_message_change", args=[trail.pk])).content.decode()
    assert "2026-12-07 10:41:05 UTC" in page and "2026-12-07 10:41:06 UTC" in page  # the letter and its deliveries
    assert '<pre class="json">{\n  &quot;k&quot;: &quot;v&quot;\n}</pre>' in page
    for name in ("worker", "apitoken"):
        assert admin_client.get(reverse(f"admin:messaging_{name}_changelist")).status_code == HTTPStatus.OK


def test_the_delivery_list_shows_status_before_the_long_columns():
    from messaging.web.admin.deliveries import DeliveryAdmin

    assert DeliveryAdmin.list_display.index("status") <= 1 and len(DeliveryAdmin.list_display) <= 8
