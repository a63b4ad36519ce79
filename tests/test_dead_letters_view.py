"""The dead-letter view and peek, against real dead letters: a `consume` subprocess rejects letters into a
dead-letter exchange, a TTL expires another; the pages, the API and the admin show them grouped by original
queue and reason with their trails, and peeking leaves every queue as it was."""
from __future__ import annotations

import uuid
from http import HTTPStatus
from urllib.parse import quote, unquote

import pika
import pytest
from django.urls import resolve, reverse

from messaging.models import Delivery, Message
from tests.audit_data import HOSTILE, delivery, fast_passwords, letter  # noqa: F401 — autouse
from tests.conftest import management_api, management_url, queue_depth, rabbitmq_url, rabbitmq_vhost, wait_for

pytestmark = pytest.mark.django_db  # the module's dead letters are committed once, outside the tests' transactions

HOSTILE_HEADER = "<script>alert('header')</script>"


def management_depth(name: str) -> int | None:
    """The queue's message count as the management API gives it (its figures lag a few seconds)."""
    return management_api(f"queues/{rabbitmq_vhost()}/{quote(name, safe='')}").get("messages")


@pytest.fixture(scope="module")
def dead_letters(django_db_setup, django_db_blocker, tmp_path_factory):
    """A dead-letter queue (with "/" and "." in its name) holding 2 letters rejected by a real worker on
    `source` (with a hostile body and header) and 1 expired by TTL on `expiring` (never consumed)."""
    from tests.conftest import Process, subprocess_env

    uid = uuid.uuid4().hex[:8]
    names = {"source": f"deadview-src-{uid}", "expiring": f"deadview-ttl-{uid}",
             "exchange": f"deadview-dlx-{uid}", "dlq": f"deadview/dlq.{uid}"}
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
    channel = conn.channel()
    channel.exchange_declare(names["exchange"], exchange_type="fanout")
    channel.queue_declare(names["dlq"])
    channel.queue_bind(names["dlq"], names["exchange"])
    channel.queue_declare(names["source"], arguments={"x-dead-letter-exchange": names["exchange"]})
    channel.queue_declare(names["expiring"], arguments={"x-dead-letter-exchange": names["exchange"],
                                                        "x-message-ttl": 1})
    channel.confirm_delivery()
    ids = {"poison": f"deadview-poison-{uid}", "hostile": f"deadview-hostile-{uid}", "ok": f"deadview-ok-{uid}",
           "expired": f"deadview-expired-{uid}"}
    for key, body, headers in (("poison", b"poison 1", {}),
                               ("hostile", b"poison " + HOSTILE.encode(), {"note": HOSTILE_HEADER}),
                               ("ok", b"fine", {})):
        channel.basic_publish("", names["source"], body, pika.BasicProperties(message_id=ids[key], headers=headers))
    channel.basic_publish("", names["expiring"], b"too late", pika.BasicProperties(message_id=ids["expired"]))
    try:
        with django_db_blocker.unblock():
            worker = Process(["consume", names["source"], "--handler", "tests.handlers.fail_on_poison",
                              "--max-retries", "0", "--max-messages", "3"],
                             env=subprocess_env(), log_dir=tmp_path_factory.mktemp("deadview"))
            try:
                assert worker.wait(60) == 0, worker.output
            finally:
                worker.stop()
            wait_for(lambda: queue_depth(names["dlq"])[0] == 3, message="3 dead letters")
            yield names, ids
            Delivery.objects.filter(queue__startswith="deadview-").delete()
            Message.objects.filter(message_id__startswith="deadview-").delete()
    finally:
        for queue in ("source", "expiring", "dlq"):
            channel.queue_delete(names[queue])
        channel.exchange_delete(names["exchange"])
        conn.close()


@pytest.fixture
def reader(client, settings):
    """A user who may read letters (view_message), the management API on."""
    from django.contrib.auth.models import Permission, User

    settings.RABBITMQ_MANAGEMENT_URL = management_url()
    user = User.objects.create_user(f"reader-{uuid.uuid4().hex[:6]}", password="pw-for-tests")
    user.user_permissions.add(Permission.objects.get(codename="view_message"))
    client.force_login(user)
    return client


def page_of(dlq: str, **query) -> str:
    url = reverse("dead-letter-queue", kwargs={"queue": dlq})
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def test_the_list_names_the_dead_letter_queue_and_who_sends_there(reader, dead_letters):
    names, _ = dead_letters
    response = reader.get(reverse("dead-letters"))
    assert response.status_code == HTTPStatus.OK
    row = next(q for q in response.context["queues"] if q.name == names["dlq"])
    assert row.exchanges == (names["exchange"],)
    assert set(row.sources) == {names["source"], names["expiring"]}
    assert names["source"] not in [q.name for q in response.context["queues"]]
    assert reverse("dead-letter-queue", kwargs={"queue": names["dlq"]}) in response.content.decode()


def test_the_queue_page_groups_by_original_queue_and_reason_with_trails(reader, dead_letters):
    names, ids = dead_letters
    before = queue_depth(names["dlq"])[0]
    response = reader.get(page_of(names["dlq"]))
    assert response.status_code == HTTPStatus.OK, response.content[:500]
    found = response.context["found"]
    groups = {(g.original_queue, g.reason): g for g in found.groups}
    assert set(groups) == {(names["source"], "rejected"), (names["expiring"], "expired")}
    rejected = {letter.copy.message_id: letter for letter in groups[(names["source"], "rejected")].letters}
    assert set(rejected) == {ids["poison"], ids["hostile"]}
    trail = rejected[ids["poison"]].trail
    assert [(s.queue, s.status) for s in trail] == [(names["source"], Delivery.Status.REJECTED)]
    assert trail[0].error == "ValueError: poison letter"
    expired = groups[(names["expiring"], "expired")].letters
    assert [letter.copy.message_id for letter in expired] == [ids["expired"]] and expired[0].message is None
    html = response.content.decode()
    assert "ValueError: poison letter" in html and "not in the history" in html
    assert HOSTILE not in html and HOSTILE_HEADER not in html and "<script>" not in html
    assert "&lt;script&gt;alert(" in html
    assert "marked redelivered" in html  # says what reading did
    assert queue_depth(names["dlq"])[0] == before == 3


def test_the_filters_narrow_the_groups_and_bad_ones_are_explained(reader, dead_letters):
    names, ids = dead_letters
    only_expired = reader.get(page_of(names["dlq"], reason="expired")).context["found"]
    assert [(g.original_queue, g.reason) for g in only_expired.groups] == [(names["expiring"], "expired")]
    only_source = reader.get(page_of(names["dlq"], original=names["source"])).context["found"]
    assert [(g.original_queue, g.reason) for g in only_source.groups] == [(names["source"], "rejected")]
    none = reader.get(page_of(names["dlq"], original=names["source"], reason="maxlen"))
    assert none.context["found"].groups == [] and "match the filters" in none.content.decode()
    for query in ({"reason": "<b>bogus</b>"}, {"count": "0"}, {"count": "51"}, {"count": "x"}):
        bad = reader.get(page_of(names["dlq"], **query))
        assert bad.status_code == HTTPStatus.BAD_REQUEST, query
        assert "<b>bogus" not in bad.content.decode() and "class=\"error\"" in bad.content.decode()
    missing = reader.get(reverse("dead-letter-queue", kwargs={"queue": f"{names['dlq']}-nope"}))
    assert missing.status_code == HTTPStatus.NOT_FOUND and "no queue with this name" in missing.content.decode()


def test_the_api_lists_and_groups_the_same(reader, dead_letters):
    names, ids = dead_letters
    listed = reader.get("/api/dead-letters/").json()
    row = next(q for q in listed["queues"] if q["name"] == names["dlq"])
    assert row["dead_letter_exchanges"] == [names["exchange"]]
    assert sorted(row["dead_letters_from"]) == sorted([names["source"], names["expiring"]])
    url = reverse("api-dead-letter-queue", kwargs={"queue": "-"}).removesuffix("-/")
    answer = reader.get(url + quote(names["dlq"], safe="") + "/?reason=rejected")
    assert answer.status_code == HTTPStatus.OK, answer.content
    body = answer.json()
    assert body["depth"] == 3 and body["read"] == 3 and "redelivered" in body["notice"]
    [group] = body["groups"]
    assert (group["original_queue"], group["reason"]) == (names["source"], "rejected")
    hostile = next(m for m in group["messages"] if m["message_id"] == ids["hostile"])
    assert hostile["body"] == "poison " + HOSTILE and hostile["headers"]["note"] == HOSTILE_HEADER
    assert hostile["letter_status"] == Message.Status.EXTERNAL
    assert [(s["queue"], s["status"], s["error"]) for s in hostile["trail"]] == [
        (names["source"], "rejected", "ValueError: poison letter")]
    assert hostile["deaths"][0]["queue"] == names["source"] and hostile["deaths"][0]["count"] == 1
    bad = reader.get(url + quote(names["dlq"], safe="") + "/?reason=bogus")
    assert bad.status_code == HTTPStatus.BAD_REQUEST and set(bad.json()) >= {"detail", "code"}
    assert reader.get(url + "deadview-no-such-queue/").status_code == HTTPStatus.NOT_FOUND
    # The letter's own answer carries the death columns too.
    detail = reader.get(f"/api/messages/{ids['poison']}/").json()
    assert {"death_reason", "dead_lettered_from", "retry_delay_seconds", "died_at"} <= set(detail["deliveries"][0])


def test_peek_shows_the_bodies_and_leaves_the_queue_as_it_was(reader, dead_letters, amqp):
    names, ids = dead_letters
    url = reverse("queue-detail", kwargs={"queue": names["dlq"]})
    page = reader.get(url)
    assert page.status_code == HTTPStatus.OK and "marked redelivered" in page.content.decode()
    assert page.context["peeked"] is None  # a GET shows the queue only; peeking is a POST
    response = reader.post(url, {"count": "2"})
    assert response.status_code == HTTPStatus.OK
    peeked = response.context["peeked"]
    assert [item["copy"].position for item in peeked] == [1, 2]
    assert {item["copy"].message_id for item in peeked} <= {ids["poison"], ids["hostile"], ids["expired"]}
    html = response.content.decode()
    assert "poison 1" in html or "too late" in html
    assert "<script>" not in html
    assert queue_depth(names["dlq"]) == (3, 0)
    wait_for(lambda: management_depth(names["dlq"]) == 3, timeout=15, message="the management API's count")
    assert reader.post(url, {"count": "51"}).status_code == HTTPStatus.BAD_REQUEST
    # Nothing lost: every letter is still there, the peeked ones marked redelivered.
    seen = {}
    for _ in range(3):
        method, properties, _body = amqp.basic_get(names["dlq"])
        seen[properties.message_id] = method.redelivered
    try:
        assert set(seen) == {ids["poison"], ids["hostile"], ids["expired"]}
        assert sum(seen.values()) >= 2
    finally:
        amqp.connection.close()  # unacked: all three go back


def test_without_the_management_api_pages_say_so_and_the_api_answers_503(reader, settings, dead_letters):
    names, _ = dead_letters
    settings.RABBITMQ_MANAGEMENT_URL = ""
    listed = reader.get(reverse("dead-letters"))
    assert listed.status_code == HTTPStatus.OK and "management API is not configured" in listed.content.decode()
    assert reader.get(page_of(names["dlq"])).status_code == HTTPStatus.SERVICE_UNAVAILABLE
    queue = reader.get(reverse("queue-detail", kwargs={"queue": names["dlq"]}))
    assert queue.status_code == HTTPStatus.SERVICE_UNAVAILABLE and "not configured" in queue.content.decode()
    api = reader.get("/api/dead-letters/")
    assert api.status_code == HTTPStatus.SERVICE_UNAVAILABLE and api.json()["code"] == "unavailable"
    settings.RABBITMQ_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:1/"
    down = reader.get(page_of(names["dlq"]))
    assert down.status_code == HTTPStatus.SERVICE_UNAVAILABLE and "did not answer" in down.content.decode()
    assert "guest:guest" not in down.content.decode()
    assert queue_depth(names["dlq"])[0] == 3


def test_the_admin_filters_deliveries_by_death(admin_client):
    m = letter(message_id=f"deadview-admin-{uuid.uuid4().hex[:6]}")
    died = delivery(m, queue="deadview-dlq-admin", death_reason=Delivery.DeathReason.EXPIRED,
                    dead_lettered_from="deadview-src-admin", death_count=2, death_exchange="deadview-dlx")
    plain = delivery(m, queue="deadview-src-admin")
    url = reverse("admin:messaging_delivery_changelist")
    for query, expected in (("death_reason=expired", {died.pk}), ("death_reason=any", {died.pk}),
                            ("death_reason=rejected", set()), ("dead_lettered_from=deadview-src-admin", {died.pk})):
        response = admin_client.get(f"{url}?{query}")
        shown = {d.pk for d in response.context["cl"].result_list} & {died.pk, plain.pk}
        assert shown == expected, query
    change = admin_client.get(reverse("admin:messaging_delivery_change", args=[died.pk])).content.decode()
    assert "deadview-src-admin" in change and "expired (TTL)" in change
    message_page = admin_client.get(reverse("admin:messaging_message_change", args=[m.pk])).content.decode()
    assert "expired (TTL) from deadview-src-admin ×2" in message_page


def test_anonymous_is_sent_to_log_in(client):
    for name, kwargs in (("dead-letters", {}), ("dead-letter-queue", {"queue": "q"}), ("queue-detail", {"queue": "q"})):
        response = client.get(reverse(name, kwargs=kwargs))
        assert response.status_code == HTTPStatus.FOUND and "login" in response["Location"]


def test_odd_queue_names_make_links_that_lead_back_to_them(reader):
    for name in (".", "..", "a/replay", "%2E", "100%", "sp ace", "x?y#z"):
        url = reverse("dead-letter-queue", kwargs={"queue": name})
        match = resolve(unquote(url))  # what the server resolves once it has decoded the path
        assert match.kwargs["queue"] == name and match.url_name == "dead-letter-queue", (name, url)
        assert "/./" not in url and "/../" not in url


def test_the_admin_lists_dead_letter_queues_and_groups_one(admin_client, settings, dead_letters):
    names, ids = dead_letters
    settings.RABBITMQ_MANAGEMENT_URL = management_url()
    changelist = admin_client.get(reverse("admin:messaging_delivery_changelist")).content.decode()
    listing_url = reverse("admin:messaging_delivery_dead_letters")
    assert listing_url in changelist
    listing = admin_client.get(listing_url)
    assert listing.status_code == HTTPStatus.OK
    queue_url = reverse("admin:messaging_delivery_dead_letter_queue", kwargs={"queue": names["dlq"]})
    assert queue_url in listing.content.decode()
    contents = admin_client.get(queue_url)
    groups = {(g.original_queue, g.reason): len(g.letters) for g in contents.context["found"].groups}
    assert groups == {(names["source"], "rejected"): 2, (names["expiring"], "expired"): 1}
    html = contents.content.decode()
    assert "ValueError: poison letter" in html and "<script>" not in html
    settings.RABBITMQ_MANAGEMENT_URL = ""
    assert admin_client.get(queue_url).status_code == HTTPStatus.SERVICE_UNAVAILABLE


def test_a_stream_queue_cannot_be_peeked_and_the_page_says_why(reader, amqp):
    name = f"deadview-stream-{uuid.uuid4().hex[:8]}"
    amqp.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
    try:
        url = reverse("queue-detail", kwargs={"queue": name})
        # A new stream's get may first be a 500 of the management API's own (the page says so, 503).
        response = wait_for(lambda: (r := reader.post(url, {"count": "1"})).status_code != 503 and r,
                            timeout=20, message="the management API's answer for the new stream")
        assert response.status_code == HTTPStatus.CONFLICT, response.context["error"]
        assert "not supported by stream queues" in response.content.decode()
        api = wait_for(lambda: (r := reader.get(f"/api/dead-letters/{name}/")).status_code != 503 and r,
                       timeout=20, message="the management API's answer for the new stream")
        assert api.status_code == HTTPStatus.CONFLICT and api.json()["code"] == "conflict"
    finally:
        amqp.queue_delete(name)
