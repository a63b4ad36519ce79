"""`x-death` read into fields, in the three forms it arrives in, and whatever else a producer writes."""

import datetime as dt

from messaging.amqp import stored
from messaging.amqp.deaths import Death, deaths, last_death, origin

WHEN = dt.datetime(2026, 12, 7, 13, 0, tzinfo=dt.UTC)

HISTORY = [  # most recent first, as RabbitMQ writes it: rejected on "work" after a retry queue's TTL
    {"count": 3, "reason": "rejected", "queue": "work", "time": WHEN, "exchange": "", "routing-keys": ["work"]},
    {"count": 2, "reason": "expired", "queue": "work.retry.1s", "time": WHEN, "exchange": "",
     "routing-keys": ["work.retry.1s"]},
]


def test_pika_form():
    found = deaths({"x-death": HISTORY})
    assert found[0] == Death(queue="work", reason="rejected", exchange="", routing_keys=("work",), count=3, time=WHEN)
    assert found[1].reason == "expired" and found[1].count == 2
    assert last_death({"x-death": HISTORY}).queue == "work"


def test_management_api_form_has_seconds():
    entry = dict(HISTORY[0], time=int(WHEN.timestamp()))
    assert last_death({"x-death": [entry]}).time == WHEN


def test_stored_form():
    headers = stored.from_json(stored.to_json({"x-death": HISTORY}))
    assert deaths(headers) == deaths({"x-death": HISTORY})
    assert deaths(stored.to_json({"x-death": HISTORY}))[0].time == WHEN  # the tagged form, read as is


def test_origin_skips_named_queues():
    history = list(reversed(HISTORY))  # a retry queue's expiry the most recent
    assert origin({"x-death": history}, skip={"work.retry.1s"}).queue == "work"
    assert origin({"x-death": history}).queue == "work.retry.1s"


def test_fields_for_the_delivery_row():
    assert last_death({"x-death": HISTORY}).as_fields() == {
        "dead_lettered_from": "work", "death_reason": "rejected", "death_exchange": "",
        "death_routing_keys": ["work"], "death_count": 3, "died_at": WHEN,
    }


def test_untrusted_shapes_are_skipped():
    assert deaths(None) == [] and deaths({"x-death": "work"}) == [] and deaths({"x-death": [1, None, []]}) == []
    bad = [{"queue": "q", "reason": "bored"}, {"reason": "rejected"}, {"queue": {"a": 1}, "reason": "rejected"}]
    assert deaths({"x-death": bad}) == []
    odd = last_death({"x-death": [{"queue": b"q\xff\x00", "reason": "maxlen", "count": -4, "time": "yesterday",
                                   "routing-keys": "k", "exchange": 5}]})
    assert odd == Death(queue="q\ufffd\\u0000", reason="maxlen", exchange="5", routing_keys=(), count=1, time=None)
    assert last_death({"x-death": [{"queue": "q" * 300, "reason": "expired", "time": 10**15}]}).queue == "q" * 255
