"""Whether a delivery is its letter's: the body it carried and the route it took.

A `message_id` is the producer's word, not proof: anyone may publish another body under a letter's
id, to any queue. Each delivery is compared with the letter it is filed under, as a plain value
written with the row (`Delivery.anomaly`), so that pages, filters and reconciliation query it.

Routed means: the delivery's exchange and routing key are the letter's (a default-exchange publish
to queue A arrives with exchange '' and routing key A; a fanout or topic exchange delivers every
bound queue the same pair), or its `x-death` header names them (a dead-lettered copy). Only for
letters Mailroom published: another producer's letter is known only by its first delivery, whose
route says nothing of where else the producer sent it. A producer can write `x-death` itself, so
a copy with the letter's body and a forged `x-death` passes as routed; its body cannot. A copy back
from one of its queue's retry queues (`consumer.retries`) arrives through the default exchange: it
took the route of the delivery it is a copy of, and is compared by its body only.
"""
from __future__ import annotations

from messaging.amqp.codec import text_value
from messaging.models import Delivery, Message

# (pk, body_sha256, exchange, routing_key, origin) of the letter a delivery is filed under
Filed = tuple[int, str, str, str, str]

EXTERNAL = Message.Origin.EXTERNAL.value

MARKS = {  # (body differs, not routed) -> the mark written
    (False, False): Delivery.Anomaly.NONE.value,
    (True, False): Delivery.Anomaly.BODY.value,
    (False, True): Delivery.Anomaly.ROUTE.value,
    (True, True): Delivery.Anomaly.BODY_AND_ROUTE.value,
}

BODY_MARKS = frozenset({Delivery.Anomaly.BODY.value, Delivery.Anomaly.BODY_AND_ROUTE.value})


def anomaly(*, filed: Filed, sha256: str, exchange: str, routing_key: str, headers, retried: bool = False) -> str:
    """The mark of a delivery (body sha256, exchange and routing key as stored) filed under `filed`;
    `retried`: a copy back from a retry queue."""
    _, body_sha256, letter_exchange, letter_key, origin = filed
    # A row written without its digest (by hand, or before digests existed) cannot be compared.
    differs = bool(body_sha256) and sha256 != body_sha256
    strayed = (origin != EXTERNAL and not retried and (exchange != letter_exchange or routing_key != letter_key)
               and not dead_lettered_from(headers, exchange=letter_exchange, routing_key=letter_key))
    return MARKS[differs, strayed]


def dead_lettered_from(headers, *, exchange: str, routing_key: str) -> bool:
    """Whether `headers` hold an `x-death` entry naming `exchange` and `routing_key` (untrusted: any shape)."""
    deaths = headers.get("x-death") if isinstance(headers, dict) else None
    if not isinstance(deaths, list):
        return False
    for death in deaths:
        if not isinstance(death, dict) or _name(death.get("exchange", "")) != exchange:
            continue
        keys = death.get("routing-keys")
        if isinstance(keys, list) and any(_name(key) == routing_key for key in keys):
            return True
    return False


def _name(value) -> str:
    """An exchange or routing key from a header as its column stores it."""
    return value if type(value) is str and "\x00" not in value else text_value(value)[:255]
