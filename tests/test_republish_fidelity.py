"""Republishing another producer's letter sends its headers and properties again exactly as they came."""
from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pika
import pika.data
import pytest
from django.urls import reverse

from messaging.amqp.codec import PIKA_DECODE_VALUE
from messaging.models import Message
from tests.audit_data import letter
from tests.conftest import delete_queue

pytestmark = pytest.mark.django_db(transaction=True)

# Every kind of AMQP field value pika sends. A float goes out as an AMQP double (as Java, Go and kombu
# send them; pika alone cannot); a long string that is not UTF-8 only a raw frame could send, and
# pika reads it as bytes, as it reads a byte array.
HEADERS = {
    "text": "plain é", "nul text": "a\x00b", "binary": b"\x00\xff", "utf8 bytes": b"caf\xc3\xa9", "empty bytes": b"",
    b"\xff\xfe": "a name that is not UTF-8", "name\x00with nul": 1, "$bytes": "a name that looks like a tag",
    "looks like a tag": {"$bytes": "AA=="}, "old marker": {"$base64": "AA=="}, "backslash": "a\\u0000b",
    "amount": decimal.Decimal("1.23"), "negative amount": decimal.Decimal("-0.005"),
    "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    "nested": {"table": {"deeper": [1, "two", None]}, "empty": {}}, "mixed": [1, "a", b"\x01", True, None, [2.5]],
    "yes": True, "no": False, "small": 7, "int32": 2**31 - 1, "int64": 2**63 - 1, "min": -2**63, "negative": -5,
    "ratio": 1.5, "huge": 1e300, "void": None,
}
PROPERTIES = {
    "content_type": "application/x-odd", "content_encoding": "gzip", "app_id": "odd-producer", "type": "greeting",
    "timestamp": 1_767_323_045, "expiration": "600000", "priority": 3, "correlation_id": "corr-1",
    "reply_to": "replies", "cluster_id": "cluster-a", "delivery_mode": 2,
}


@pytest.fixture
def readers():
    """Two queues of the test's own: one read as a plain pika consumer reads, one as Mailroom reads."""
    names = [f"t-fidelity-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("plain", "mailroom")]
    yield names
    for name in names:
        delete_queue(name)


def test_a_copy_of_another_producers_letter_has_the_same_headers_and_properties(
        amqp, queue_name, readers, manage, publisher_client, monkeypatch):
    exchange = f"t-fidelity-{uuid.uuid4().hex[:8]}"
    amqp.exchange_declare(exchange=exchange, exchange_type="fanout", auto_delete=True)
    for name in (queue_name, *readers):
        amqp.queue_declare(queue=name)
        amqp.queue_bind(queue=name, exchange=exchange)
    message_id = f"odd-{uuid.uuid4().hex}"
    amqp.basic_publish(exchange=exchange, routing_key="k", body=b"\x00body\xff",
                       properties=pika.BasicProperties(message_id=message_id, headers=HEADERS, **PROPERTIES))

    worker = manage("consume", queue_name, "--max-messages", "1", "--inactivity-timeout", "20")
    assert worker.wait(timeout=60) == 0, worker.output
    original = Message.objects.get(message_id=message_id)
    assert original.origin == Message.Origin.EXTERNAL

    letter_page = publisher_client.get(reverse("message-detail", args=[message_id])).content.decode()
    assert "&quot;$bytes&quot;: &quot;AP8=&quot;" in letter_page  # the stored tags, shown as escaped JSON
    page = publisher_client.get(reverse("message-republish", args=[message_id])).content.decode()
    assert "cannot send everything exactly" not in page  # nothing this consumer recorded is lost
    response = publisher_client.post(reverse("message-republish", args=[message_id]))
    copy = Message.objects.get(republished_from=original)
    assert response.status_code == 302 and copy.status == Message.Status.PUBLISHED, copy.last_error

    received_by_mailroom = [amqp.basic_get(readers[1], auto_ack=True) for _ in range(2)]
    monkeypatch.setattr(pika.data, "decode_value", PIKA_DECODE_VALUE)  # pika as it ships (doubles as ints)
    received_by_pika = [amqp.basic_get(readers[0], auto_ack=True) for _ in range(2)]

    for (_, first, body), (_, second, copied) in (received_by_mailroom, received_by_pika):
        assert body == copied == b"\x00body\xff"
        assert first.message_id == message_id and second.message_id == copy.message_id
        assert same(first.headers, second.headers), (first.headers, second.headers)
        for name in (*PROPERTIES, "user_id"):
            assert same(getattr(first, name), getattr(second, name)), name
    sent = received_by_mailroom[0][1].headers
    assert same(sent, HEADERS), {k: (v, sent.get(k)) for k, v in HEADERS.items() if not same(v, sent.get(k))}
    assert received_by_pika[0][1].headers["ratio"] == 1  # pika's own reading of a double, the same for the copy


def same(a, b) -> bool:
    """Equal, and of the same kinds all the way down (1 == 1.0 == True in Python; b"x" != "x" on the wire)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return kind(a) is kind(b) and a == b


def kind(value) -> type:
    """A value's type, pika's `long` (an int subclass it decodes 64-bit integers as) counted as int."""
    return int if isinstance(value, int) and not isinstance(value, bool) else type(value)


def test_the_confirmation_page_names_what_an_earlier_recording_lost(publisher_client):
    old = letter(origin=Message.Origin.EXTERNAL, status=Message.Status.EXTERNAL, routing_key="q",
                 headers={"nul": "a\\u0000b", "<b>name</b>": "(not decoded: nested deeper than 64 levels, 9 bytes)",
                          "bytes": {"$base64": "AP8="}},
                 properties={"user_id": "someone-else"}, content_type="text/\ufffd")
    page = publisher_client.get(reverse("message-republish", args=[old.message_id])).content.decode()
    assert "cannot send everything exactly" in page
    assert "headers[&#x27;nul&#x27;] was recorded with NUL characters written as the text \\u0000" in page
    assert "headers[&#x27;&lt;b&gt;name&lt;/b&gt;&#x27;] was not decoded" in page and "<b>name" not in page
    assert "content_type was recorded with its invalid bytes" in page
    assert "user_id &#x27;someone-else&#x27; is sent again" in page
    assert "headers[&#x27;bytes&#x27;]" not in page  # restored exactly, as bytes


def test_the_admin_confirmation_names_it_too(client, django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("adm", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    client.force_login(user)
    old = letter(origin=Message.Origin.EXTERNAL, status=Message.Status.EXTERNAL, headers={"nul": "a\\u0000b"})
    page = client.post(reverse("admin:messaging_message_changelist"),
                       {"action": "republish_messages", "_selected_action": [old.pk]}).content.decode()
    assert f"The copy of {old.message_id} cannot send everything exactly" in page
    assert "headers[&#x27;nul&#x27;] was recorded with NUL characters" in page
