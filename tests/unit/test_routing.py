"""messaging.outbox.routing: AMQP topic and headers matching, and the preview from the management API's
bindings (the API answered here by a stand-in)."""
from __future__ import annotations

import time

import pytest

from messaging.amqp import management
from messaging.outbox import routing
from messaging.outbox.routing import _matches, preview_route, topic_matches


@pytest.mark.parametrize("pattern, key, expected", [
    ("orders.*", "orders.new", True),
    ("orders.*", "orders", False),  # '*' is exactly one word
    ("orders.*", "orders.new.eu", False),
    ("orders.#", "orders", True),  # '#' is zero or more words
    ("orders.#", "orders.new.eu", True),
    ("#", "", True),
    ("#", "anything.at.all", True),
    ("*", "", False),
    ("", "", True),
    ("", "a", False),
    ("#.eu", "eu", True),
    ("#.eu", "orders.new.eu", True),
    ("#.eu", "orders.eu.new", False),
    ("*.*.eu", "orders.new.eu", True),
    ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.c.z", True),
    ("a.#.z", "a.b.c", False),
    ("#.#", "x", True),
    ("orders.new", "orders.New", False),  # words compare exactly
])
def test_topic_matching(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


def test_topic_matching_stays_linear_for_many_hashes():
    started = time.monotonic()
    assert not topic_matches(".".join(["#"] * 40 + ["z"]), ".".join(["a"] * 200))
    assert topic_matches(".".join(["#"] * 40 + ["z"]), ".".join(["a"] * 200 + ["z"]))
    assert time.monotonic() - started < 1.0


def test_fanout_direct_and_topic_bindings():
    assert _matches("fanout", {"routing_key": "ignored"}, "any", {})
    assert _matches("direct", {"routing_key": "blue"}, "blue", {})
    assert not _matches("direct", {"routing_key": "blue"}, "red", {})
    assert _matches("topic", {"routing_key": "a.*"}, "a.b", {})
    assert not _matches("topic", {"routing_key": "a.*"}, "b.a", {})


def test_headers_bindings_all_and_any():
    binding = {"arguments": {"x-match": "all", "format": "pdf", "type": "report"}}
    assert _matches("headers", binding, "", {"format": "pdf", "type": "report", "extra": 1})
    assert not _matches("headers", binding, "", {"format": "pdf"})
    assert not _matches("headers", binding, "", {"format": "pdf", "type": "log"})
    any_of = {"arguments": {"x-match": "any", "format": "pdf", "type": "report"}}
    assert _matches("headers", any_of, "", {"type": "report"})
    assert not _matches("headers", any_of, "", {"other": "report"})
    assert _matches("headers", {"arguments": {"format": "pdf"}}, "", {"format": "pdf"})  # x-match defaults to all


def test_headers_bindings_ignore_x_arguments_unless_with_x():
    binding = {"arguments": {"x-match": "all", "x-tenant": "t1"}}
    assert _matches("headers", binding, "", {})  # x-* arguments are not matched
    with_x = {"arguments": {"x-match": "all-with-x", "x-tenant": "t1"}}
    assert not _matches("headers", with_x, "", {})
    assert _matches("headers", with_x, "", {"x-tenant": "t1"})


@pytest.fixture
def broker(monkeypatch, settings):
    """A management API that answers with these exchanges, bindings and queues."""
    settings.RABBITMQ_MANAGEMENT_URL = "http://guest:guest@management.invalid:15672/"
    state = {
        "queues": [{"name": "invoices"}, {"name": "audit"}, {"name": "eu-orders"}],
        "exchanges": [{"name": "", "type": "direct"}, {"name": "shop", "type": "topic"},
                      {"name": "fan", "type": "fanout"}, {"name": "docs", "type": "headers"}],
        "bindings": [
            {"source": "shop", "destination": "invoices", "destination_type": "queue", "routing_key": "invoice.*"},
            {"source": "shop", "destination": "fan", "destination_type": "exchange", "routing_key": "#.eu"},
            {"source": "fan", "destination": "audit", "destination_type": "queue", "routing_key": ""},
            {"source": "fan", "destination": "eu-orders", "destination_type": "queue", "routing_key": ""},
            {"source": "fan", "destination": "shop", "destination_type": "exchange", "routing_key": ""},  # a loop
            {"source": "docs", "destination": "audit", "destination_type": "queue", "routing_key": "",
             "arguments": {"x-match": "any", "kind": "pdf"}},
        ],
    }
    for name in ("queues", "exchanges", "bindings"):
        monkeypatch.setattr(management, name, lambda name=name: state[name])
    return state


def test_preview_follows_exchange_to_exchange_bindings(broker):
    preview = preview_route(exchange="shop", routing_key="invoice.eu", headers={})
    assert preview.known and preview.queues == ("audit", "eu-orders", "invoices")
    assert preview.text == "reaches queues audit, eu-orders, invoices"
    assert preview_route(exchange="shop", routing_key="invoice.us", headers={}).queues == ("invoices",)
    assert preview_route(exchange="docs", routing_key="", headers={"kind": "pdf"}).queues == ("audit",)


def test_preview_says_why_nothing_is_reached(broker):
    assert preview_route(exchange="shop", routing_key="other", headers={}).text == \
        "no queue is bound: it would be returned"
    missing = preview_route(exchange="nope", routing_key="k", headers={})
    assert missing.known and "no exchange named 'nope'" in missing.text and "404" in missing.text
    assert "will be declared" in preview_route(exchange="nope", routing_key="k", headers={}, declare=True).text


def test_preview_on_the_default_exchange_reads_the_queues(broker):
    assert preview_route(exchange="", routing_key="invoices", headers={}).queues == ("invoices",)
    gone = preview_route(exchange="", routing_key="missing", headers={})
    assert gone.queues == () and "no such queue" in gone.text
    declared = preview_route(exchange="", routing_key="missing", headers={}, declare=True)
    assert declared.queues == ("missing",) and declared.note == "the queue will be declared"


def test_preview_is_unknown_without_the_management_api(settings, monkeypatch, broker):
    monkeypatch.setattr(management, "bindings", lambda: None)  # the API did not answer
    assert not preview_route(exchange="shop", routing_key="k", headers={}).known
    settings.RABBITMQ_MANAGEMENT_URL = ""
    unknown = preview_route(exchange="", routing_key="invoices", headers={})
    assert not unknown.known and "Routing preview unavailable" in unknown.text
    assert routing.RoutePreview(known=False, note="said why").text == "said why"
