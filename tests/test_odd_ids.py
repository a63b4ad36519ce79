"""Any message_id (other producers choose them) has working links and redirects, and can be searched."""
from __future__ import annotations

import re
from html import unescape
from urllib.parse import unquote, urljoin

import pytest
from django.utils.html import escape

from messaging.models import Message
from messaging.web.links import message_id_from_path, message_url, path_segment
from tests.audit_data import letter

pytestmark = pytest.mark.django_db

ODD_IDS = [
    "..", ".", "/", "%2F", "a/../b", "../../accounts/logout/", " spaced ", "trailing ", " leading", "?x=1", "#top",
    "%", "100%", "a/b", "a/b/", "/x", "two\nlines", "%2E", "%2E%2E", "%252E", "%2e%2e", ".%2E", "...", "a?b#c%d",
    "é/ü", "republish", "x/republish",
]
# What a browser counts as a "." or ".." path segment (the WHATWG URL standard), which it resolves.
DOT_SEGMENT = re.compile(r"(\.|%2e){1,2}", re.IGNORECASE)


def browser_path(page_path: str, href: str) -> str:
    """Where a browser goes from `page_path` following `href`: it resolves "." and ".." segments."""
    segments = urljoin(page_path, href).split("/")
    path = []
    for i, segment in enumerate(segments):
        if DOT_SEGMENT.fullmatch(segment):
            if segment.lower().replace("%2e", ".") == ".." and len(path) > 1:
                path.pop()
            if i == len(segments) - 1:
                path.append("")
            continue
        path.append(segment)
    return "/".join(path)


@pytest.mark.parametrize("message_id", ODD_IDS + ["%25" * 3 + "2E%2E", "%252E%252E", "%25"])
def test_a_segment_reads_back_as_the_same_id_and_is_never_a_dot_segment(message_id):
    segment = path_segment(message_id)
    assert "/" not in segment and not DOT_SEGMENT.fullmatch(segment)
    assert message_id_from_path(unquote(segment)) == message_id  # the server decodes a path once


def test_no_two_ids_share_a_url():
    ids = ODD_IDS + [".%2E", "%2E.", "%252E%2E", "%25252E"]
    assert len({path_segment(i) for i in ids}) == len(set(ids))


@pytest.mark.parametrize("message_id", ODD_IDS)
def test_the_list_links_the_letter_and_its_page_links_back(publisher_client, message_id):
    letter(message_id=message_id, routing_key="odd-q")
    listed = publisher_client.get("/messages/", {"queue": "odd-q"}).content.decode()
    hrefs = [unescape(h) for h in re.findall(r'<td><a href="([^"]+)">', listed)]
    assert hrefs == [message_url("message-detail", message_id)]
    path = browser_path("/messages/", hrefs[0])
    assert path == hrefs[0]  # nothing for a browser to resolve
    page = publisher_client.get(path)
    assert page.status_code == 200 and f"<code>{escape(message_id)}</code>" in page.content.decode()
    republish = unescape(re.search(r'<a href="([^"]+)">Republish a copy', page.content.decode()).group(1))
    confirm = publisher_client.get(browser_path(path, republish))
    assert confirm.status_code == 200 and f"<code>{escape(message_id)}</code>" in confirm.content.decode()
    cancel = unescape(re.search(r'<a href="([^"]+)">Cancel', confirm.content.decode()).group(1))
    assert publisher_client.get(browser_path(republish, cancel)).status_code == 200
    api = publisher_client.get(message_url("api-message", message_id))
    assert api.status_code == 200 and api.json()["message_id"] == message_id


def test_a_copy_links_its_original(publisher_client):
    original = letter(message_id="..")
    letter(message_id="copy", republished_from=original)
    page = publisher_client.get("/messages/copy/").content.decode()
    assert f'<a href="{message_url("message-detail", "..")}">..</a>' in page


def test_a_republish_refused_redirects_to_the_original(publisher_client, settings):
    settings.MAILROOM_MAX_BODY_BYTES = 1  # the copy would be over the limit: refused, back to the original
    original = letter(message_id="../../accounts/logout/", body=b"too long")
    response = publisher_client.post(message_url("message-republish", original.message_id))
    assert response.status_code == 302 and response["Location"] == "/messages/..%2F..%2Faccounts%2Flogout%2F/"
    assert publisher_client.get(response["Location"]).status_code == 200
    assert Message.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("message_id", ["../../accounts/logout/", "..", "a/../b", "%2F", "?#%"])
def test_a_form_publish_redirects_to_the_letter(publisher_client, queue_name, message_id):
    response = publisher_client.post("/publish/", {
        "mode": "queue", "queue": queue_name, "body": "hello", "declare": "on", "body_encoding": "string",
        "message_id": message_id,
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    assert response["Location"] == message_url("message-detail", message_id)
    page = publisher_client.get(browser_path("/publish/", response["Location"]))
    assert page.status_code == 200 and f"<code>{escape(message_id)}</code>" in page.content.decode()


def test_search_matches_the_id_as_typed_and_without_its_outer_spaces(publisher_client):
    letter(message_id=" spaced ")
    letter(message_id="spaced")
    letter(message_id="other")

    def found(q: str) -> list[str]:
        html = publisher_client.get("/messages/", {"q": q}).content.decode()
        return sorted(unescape(m) for m in re.findall(r'<td><a href="[^"]+">([^<]*)</a>', html))

    assert found(" spaced ") == [" spaced ", "spaced"]
    assert found("spaced") == ["spaced"]
    assert found("  other ") == ["other"]
    assert found("   ") == [" spaced ", "other", "spaced"]  # blank: no search


def test_admin_search_matches_the_id_as_typed_and_without_its_outer_spaces(admin_client):
    letter(message_id=" spaced ")
    letter(message_id="other")
    html = admin_client.get("/admin/messaging/message/", {"q": " spaced "}).content.decode()
    assert "1 result" in html and "spaced" in html
    assert "1 result" in admin_client.get("/admin/messaging/message/", {"q": " other "}).content.decode()
