"""Every page escapes a `<script>` in a letter's body, headers, routing key and message_id."""
from __future__ import annotations

from http import HTTPStatus

import pytest
from django.urls import reverse

from messaging.models import Delivery, Message
from tests.audit_data import HOSTILE, delivery, fast_passwords, letter  # noqa: F401 — autouse

pytestmark = pytest.mark.django_db


@pytest.fixture
def hostile():
    m = letter(message_id=f"id{HOSTILE}", routing_key=f"rk{HOSTILE}", body=HOSTILE.encode(),
               headers={HOSTILE: HOSTILE}, correlation_id=HOSTILE, last_error=HOSTILE, status=Message.Status.FAILED)
    delivery(m, queue=f"q{HOSTILE}", status=Delivery.Status.REJECTED, error=HOSTILE)
    return m


def pages(m: Message) -> list[str]:
    return [
        reverse("dashboard"),
        reverse("message-list"),
        reverse("message-list") + "?status=failed",
        reverse("message-detail", args=[m.message_id]),
        reverse("queues"),
        reverse("admin:messaging_message_changelist"),
        reverse("admin:messaging_message_change", args=[m.pk]),
        reverse("admin:messaging_delivery_changelist"),
        reverse("admin:messaging_delivery_change", args=[m.deliveries.get().pk]),
    ]


def test_every_page_escapes_a_script(admin_client, hostile):
    for url in pages(hostile):
        response = admin_client.get(url)
        assert response.status_code == HTTPStatus.OK, url
        html = response.content.decode()
        assert "<script>alert" not in html, url
    # And the hostile values are there, escaped, where a page shows them.
    detail = admin_client.get(reverse("admin:messaging_message_change", args=[hostile.pk])).content.decode()
    assert "&lt;script&gt;alert(" in detail
    listing = admin_client.get(reverse("admin:messaging_message_changelist")).content.decode()
    assert "rk&lt;script&gt;" in listing
    # The body's preview in the letter list, and the headers as indented JSON on the letter page.
    letters = admin_client.get(reverse("message-list")).content.decode()
    assert '<td class="preview">&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;</td>' in letters
    page = admin_client.get(reverse("message-detail", args=[hostile.message_id])).content.decode()
    assert "{\n  &quot;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;: &quot;&lt;script&gt;" in page
    assert "{\n  &quot;&lt;script&gt;" in detail  # the admin's headers too


def test_previews_and_json_are_plain_text_whatever_the_bytes():
    from messaging.web.display import body_preview, pretty_json

    assert body_preview(b"\xff\x00\x01", size=3) == "binary, 3 bytes"
    assert body_preview(b"a\x00b", size=3) == "binary, 3 bytes"
    assert body_preview(b"", size=0) == "empty"
    assert body_preview(b"line one\n  line two", size=19) == "line one line two"
    long = ("é" * 100).encode()
    assert body_preview(long[:321], size=len(long)) == "é" * 80 + "…"  # a character cut at the end is still text
    assert body_preview(b"x" * 320, size=10_000_000) == "x" * 80 + "…"
    assert pretty_json({"b": 1, "a": [1, 2]}) == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    assert "<3 bytes: 00 3c 62>" in pretty_json({"raw": b"\x00<b"})


def test_a_large_body_shows_its_first_64_kb_on_the_letter_page(admin_client):
    """The letter page reloads itself every second while the letter settles: not megabytes each time."""
    from messaging.web.views import PAGE_BODY_BYTES, body_view

    body = b"a" * (PAGE_BODY_BYTES - 1) + "é".encode() + b"<b>" * 100_000  # "é" cut in two at the limit
    m = letter(message_id="large", body=body)
    page = admin_client.get(reverse("message-detail", args=[m.message_id])).content.decode()
    assert f"the first {PAGE_BODY_BYTES - 1} bytes of {len(body)}" in page
    assert len(page) < PAGE_BODY_BYTES + 20_000 and "<b>" not in page
    letters = admin_client.get(reverse("message-list")).content.decode()  # its first 80 characters in the list
    assert '<td class="preview">' + "a" * 80 + "…</td>" in letters
    view = body_view(body)
    assert view["text"] == "a" * (PAGE_BODY_BYTES - 1) and view["truncated"] and not view["binary"]
    assert body_view(b"\xff" + body)["binary"] and body_view(b"ok")["text"] == "ok"
    assert body_view("é".encode() * PAGE_BODY_BYTES)["text"] == "é" * (PAGE_BODY_BYTES // 2)
