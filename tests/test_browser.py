"""Real browser tests: Playwright driving Debian's chromium against the live server and a real `consume`.

Nothing here downloads a browser: `scripts/services.sh chromium` installs Debian's package.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pika
import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.test import override_settings
from playwright.sync_api import expect, sync_playwright
from pytest_django.live_server_helper import LiveServer

from messaging.models import Delivery, Message, Worker
from messaging.outbox.publishing import create_message, publish_message
from messaging.web.links import message_url
from tests.audit_data import delivery, letter
from tests.conftest import ROOT, queue_depth, wait_for

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
# The README's pictures are refreshed with MAILROOM_UPDATE_SCREENSHOTS=1; other runs keep theirs
# in test-artifacts/ (ignored by git), so a test run leaves the work tree clean.
SCREENSHOTS = ROOT / ("docs" if os.environ.get("MAILROOM_UPDATE_SCREENSHOTS") == "1" else "test-artifacts") / "screenshots"
XSS_BODY = '<script>window.__xss = 1; alert("xss")</script><img src=x onerror="window.__xss = 2">'


@pytest.fixture(scope="session")
def live_server(request):
    """pytest-django's live server, started while MEDIA_URL is set: with none, Django's test server first
    serves every path as a media file, and a path with ".." segments (a letter's message_id) is a 500."""
    addr = request.config.getvalue("liveserver") or os.environ.get("DJANGO_LIVE_TEST_SERVER_ADDRESS") or "localhost"
    with override_settings(MEDIA_URL="/media/"):
        server = LiveServer(addr)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(django_db_setup):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run `scripts/services.sh chromium` (apt-get install chromium).")
    # Playwright's sync API keeps an event loop in this thread; the ORM calls the tests make
    # between browser steps (and the flush after each) are still plain synchronous code.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.dialogs = []
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    tab.csp_violations = []
    tab.on("console", lambda msg: tab.csp_violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    tab.console_errors = []  # a missing favicon, a 404 stylesheet, a script error: each one a bug
    tab.on("console", lambda msg: tab.console_errors.append(f"{tab.url}: {msg.text}") if msg.type == "error" else None)
    tab.on("pageerror", lambda exc: tab.console_errors.append(f"{tab.url}: {exc}"))
    expect.set_options(timeout=20_000)
    yield tab
    context.close()


def log_in(page) -> User:
    user = User.objects.create_superuser("ada", password="browser-pw-123")
    page.goto("/accounts/login/")
    page.fill('input[name="username"]', "ada")
    page.fill('input[name="password"]', "browser-pw-123")
    page.click('button[type="submit"]')
    expect(page.locator("header nav")).to_contain_text("Log out ada")
    return user


PHONE = {"width": 390, "height": 844}


def page_width(page) -> int:
    """How wide the page's content is: more than the viewport means the whole page scrolls sideways."""
    return page.evaluate("document.scrollingElement.scrollWidth")


def too_wide(page) -> list[str]:
    """The elements that end right of the viewport (for the message of a failed width check)."""
    return page.evaluate("""() => [...document.querySelectorAll("body *")]
        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
        .slice(0, 8).map(e => e.tagName + "." + e.className + " " + Math.round(e.getBoundingClientRect().right))""")


def consumer_ready(name: str) -> bool:
    try:
        return queue_depth(name)[1] > 0
    except pika.exceptions.ChannelClosedByBroker:
        return False


def test_queue_letter_goes_pending_published_acked_without_reload(page, settings, manage, queue_name):
    log_in(page)
    worker = manage("consume", queue_name)
    wait_for(lambda: consumer_ready(queue_name), message="the worker to consume")

    # The web process cannot reach the broker: the letter is kept as pending (the outbox).
    reachable = settings.RABBITMQ_URL
    settings.RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:1/%2F"
    page.goto("/publish/")
    page.check('input[name="mode"][value="queue"]')
    page.fill('input[name="queue"]', queue_name)
    page.fill('textarea[name="body"]', XSS_BODY)
    page.fill('textarea[name="headers"]', '{"x-trace": "browser", "attempt": 1}')
    page.get_by_role("button", name="Publish", exact=True).click()

    status = page.locator("#letter-status")
    expect(status).to_have_text("pending")
    expect(page.locator(".flash")).to_contain_text("Not published yet")
    page.evaluate("window.__sameDocument = true")  # survives in-page updates, lost on a reload

    # The broker is back: the relay's function publishes it; the open page follows by itself.
    settings.RABBITMQ_URL = reachable
    letter = Message.objects.get(routing_key=queue_name)
    assert letter.status == Message.Status.PENDING
    assert publish_message(letter).status == Message.Status.PUBLISHED
    expect(status).to_have_text("published")
    expect(page.locator('#deliveries [data-delivery-status="acked"]')).to_have_count(1)
    expect(page.locator("#deliveries")).to_contain_text(queue_name)
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"

    # The hostile body is shown as text and never runs (escaped, and the CSP forbids inline script).
    expect(page.locator("pre.body")).to_have_text(XSS_BODY)
    assert page.evaluate("window.__xss") is None
    assert page.dialogs == []
    assert page.locator("#letter script").count() == 0
    page.reload()  # only for the picture: without the flash of the first, failed attempt
    expect(page.locator('#deliveries [data-delivery-status="acked"]')).to_have_count(1)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "letter.png"), full_page=True)

    delivery = Delivery.objects.get(message=letter)
    assert delivery.status == Delivery.Status.ACKED

    # The admin shows the same trail.
    page.goto(f"/admin/messaging/message/{letter.pk}/change/")
    expect(page.locator("body")).to_contain_text("published")
    inline = page.locator(".inline-group")
    expect(inline).to_contain_text(queue_name)
    expect(inline).to_contain_text("acked")
    assert page.evaluate("window.__xss") is None and page.dialogs == []

    # A little traffic for the dashboard's picture, then the dashboard itself.
    for i in range(20):
        with transaction.atomic():
            create_message(routing_key=queue_name, body=f"letter {i}".encode(), content_type="text/plain")
    wait_for(lambda: Delivery.objects.filter(queue=queue_name, status=Delivery.Status.ACKED).count() == 21,
             message="the traffic to be acked")
    page.goto("/")
    expect(page.locator("main")).to_contain_text(queue_name)  # its worker, alive
    expect(page.locator("main")).to_contain_text("published (21)")
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

    # The other pictures of the README, from the same traffic.
    page.goto("/messages/")
    expect(page.locator('[data-delivery="acked"]')).to_have_count(21)
    page.screenshot(path=str(SCREENSHOTS / "messages.png"), full_page=True)
    page.goto("/publish/")
    page.check('input[name="mode"][value="queue"]')
    page.fill('input[name="queue"]', queue_name)
    page.fill('textarea[name="body"]', '{"order": 42, "total": "19.99"}')
    page.screenshot(path=str(SCREENSHOTS / "publish.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto("/admin/messaging/delivery/")
    expect(page.locator("#result_list td.field-status").first).to_have_text("acked")
    page.screenshot(path=str(SCREENSHOTS / "admin-deliveries.png"))
    page.set_viewport_size(PHONE)
    page.goto("/messages/")
    assert page_width(page) <= PHONE["width"]
    page.screenshot(path=str(SCREENSHOTS / "messages-phone.png"))
    assert page.csp_violations == [], page.csp_violations
    assert page.console_errors == [], page.console_errors
    assert worker.proc.poll() is None, worker.output


def test_fanout_letter_is_delivered_and_shown_without_reload(page, manage, amqp):
    exchange = f"t-fanout-{uuid.uuid4().hex[:8]}"
    try:
        log_in(page)
        worker = manage("consume", "--exchange", exchange, "--exchange-type", "fanout")
        wait_for(lambda: "consuming queues=" in worker.output, message="the worker to bind its queue")

        page.goto("/publish/")
        page.check('input[name="mode"][value="exchange"]')
        page.fill('input[name="exchange"]', exchange)
        page.select_option('select[name="exchange_type"]', "fanout")
        page.fill('textarea[name="body"]', "to everyone bound")
        page.get_by_role("button", name="Publish", exact=True).click()

        expect(page.locator(".flash")).to_contain_text("Published.")
        expect(page.locator("#letter-status")).to_have_text("published")
        page.evaluate("window.__sameDocument = true")
        expect(page.locator('#deliveries [data-delivery-status="acked"]')).to_have_count(1)
        assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
        letter = Message.objects.get(exchange=exchange)
        delivery = Delivery.objects.get(message=letter)
        assert delivery.status == Delivery.Status.ACKED
        assert delivery.queue.startswith("amq.gen-")  # the worker's own server-named queue
        assert page.csp_violations == [], page.csp_violations
    finally:
        amqp.exchange_delete(exchange=exchange)


def test_pages_fit_a_laptop_and_a_phone_and_log_no_errors(page):
    """Long names and values never push the admin's status column off a 1280 px screen or widen a phone's page."""
    log_in(page)
    long = "x" * 120
    for i in range(30):
        m = letter(message_id=f"order-{i}-{uuid.uuid4().hex}-{uuid.uuid4().hex}", routing_key=f"orders.{long}",
                   headers={"x-trace": long, "nested": {"path": ["a" * 60, "b" * 60]}}, correlation_id=long,
                   body=("word " * 400).encode() if i % 2 else bytes(range(256)))
        delivery(m, queue=f"q-{long}", status=Delivery.Status.REJECTED if i % 3 else Delivery.Status.ACKED,
                 error=f"Traceback\nValueError: {long}")
    Worker.objects.create(host=f"host-{long}", pid=4242, queues=[f"q-{long}", f"other-{long}"])

    page.set_viewport_size({"width": 1280, "height": 800})
    for path in ("/admin/messaging/message/", "/admin/messaging/delivery/", "/admin/messaging/worker/"):
        page.goto(path)
        header = page.locator("#result_list thead th.column-status")
        expect(header).to_be_visible()
        box = header.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 1280, (path, box)
        assert page_width(page) <= 1280, (path, page_width(page), too_wide(page))
    for path in (f"/admin/messaging/message/{m.pk}/change/", f"/admin/messaging/delivery/{m.deliveries.get().pk}/change/"):
        page.goto(path)
        expect(page.locator("#content h2").first).to_be_visible()
        assert page_width(page) <= 1280, (path, page_width(page), too_wide(page))
    page.goto(f"/admin/messaging/message/{m.pk}/change/")
    expect(page.locator(".field-headers_json pre.json")).to_contain_text('"x-trace": "xxx')

    page.set_viewport_size(PHONE)
    for path in ("/", "/messages/", f"/messages/{m.message_id}/", "/publish/", "/queues/"):
        page.goto(path)
        expect(page.locator("main h1")).to_be_visible()
        assert page_width(page) <= PHONE["width"], (path, page_width(page), too_wide(page))
        if path.startswith("/messages/order-"):
            expect(page.locator("#letter-headers")).to_contain_text('"nested": {')
    assert page.console_errors == [], page.console_errors
    assert page.csp_violations == [], page.csp_violations


def test_the_api_docs_page_runs_under_the_csp(page):
    """Swagger UI from this site's static files (no CDN) shows the schema's operations, with no CSP violation."""
    page.goto("/api/docs/")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any(p.strip().startswith("/api/messages/") for p in paths), paths
    assert page.csp_violations == []


ODD_IDS = ["..", "../../accounts/logout/", " spaced ", "a/b", "%2F", "."]


def test_links_and_redirects_reach_letters_with_odd_ids(page, queue_name):
    """A browser resolves "." and ".." in a path before it asks: every link to a letter still reaches it."""
    log_in(page)
    for message_id in ODD_IDS:
        letter(message_id=message_id, routing_key=queue_name)
    for message_id in ODD_IDS:
        page.goto("/messages/?" + urlencode({"q": message_id}))
        page.locator("table a").filter(has_text=message_id.strip()).first.click()
        code = page.locator("main h1 code")
        expect(code).to_be_visible()
        assert code.text_content() == message_id, (message_id, page.url)
        assert page.url.endswith(message_url("message-detail", message_id)), page.url
        expect(page.locator("header nav")).to_contain_text("Log out ada")  # not sent to the logout page

    # A form publish and a republish redirect to the letter they wrote; the copy links its original.
    page.goto("/publish/")
    page.check('input[name="mode"][value="queue"]')
    page.fill('input[name="queue"]', queue_name)
    page.fill('input[name="message_id"]', "../../accounts/logout/x")
    page.get_by_role("button", name="Publish", exact=True).click()
    expect(page.locator("main h1 code")).to_have_text("../../accounts/logout/x")
    page.get_by_role("link", name="Republish a copy…").click()
    expect(page.locator("main h1 code")).to_have_text("../../accounts/logout/x")
    page.get_by_role("button", name="Republish").click()
    page.locator("dd a").filter(has_text="../../accounts/logout/x").click()
    expect(page.locator("main h1 code")).to_have_text("../../accounts/logout/x")
    assert Message.objects.filter(republished_from__message_id="../../accounts/logout/x").count() == 1
    assert page.console_errors == [], page.console_errors


def test_dead_letter_pages_and_peek_fit_a_phone(page, settings, amqp):
    """The dead-letter pages and a peek, with long names, bodies and errors, fit 390 px; the Peek button works."""
    from messaging.web.links import queue_segment
    from tests.conftest import management_url

    settings.RABBITMQ_MANAGEMENT_URL = management_url()
    log_in(page)
    uid, long = uuid.uuid4().hex[:8], "y" * 120
    exchange, dlq, source = f"deadview-dlx-{uid}", f"deadview/dlq-{uid}-{long}", f"deadview-src-{uid}-{long}"
    amqp.exchange_declare(exchange, exchange_type="fanout")
    amqp.queue_declare(dlq)
    amqp.queue_bind(dlq, exchange)
    amqp.queue_declare(source, arguments={"x-dead-letter-exchange": exchange, "x-message-ttl": 1})
    try:
        for i in range(3):
            message_id = f"deadview-{i}-{long}"
            m = letter(message_id=message_id, routing_key=source, body=("word " * 400).encode())
            delivery(m, queue=source, status=Delivery.Status.REJECTED, error=f"Traceback\nValueError: {long}")
            amqp.basic_publish("", source, ("word " * 400).encode() if i else bytes(range(256)),
                               pika.BasicProperties(message_id=message_id, headers={"x-trace": long}))
        wait_for(lambda: queue_depth(dlq)[0] == 3, message="3 dead letters")
        page.set_viewport_size(PHONE)
        dlq_path = f"/dead-letters/{queue_segment(dlq).replace('%', '%25')}/"
        for path in ("/dead-letters/", dlq_path):
            page.goto(path)
            expect(page.locator("main h1")).to_be_visible()
            assert page_width(page) <= PHONE["width"], (path, page_width(page), too_wide(page))
        expect(page.locator("main")).to_contain_text(f"ValueError: {long}")
        page.goto(f"/queues/{queue_segment(dlq).replace('%', '%25')}/")
        page.fill('input[name="count"]', "2")
        page.click('form.peek button[type="submit"]')
        expect(page.locator("main")).to_contain_text("2 messages at the head of the queue")
        assert page_width(page) <= PHONE["width"], (page.url, page_width(page), too_wide(page))
        assert queue_depth(dlq)[0] == 3
        assert page.console_errors == [], page.console_errors
        assert page.csp_violations == [], page.csp_violations
    finally:
        for queue in (dlq, source):
            amqp.queue_delete(queue)
        amqp.exchange_delete(exchange)
