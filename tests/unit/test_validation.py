"""messaging.outbox.validation: what the broker or the database would refuse, refused first, in clear words."""
from __future__ import annotations

import base64

import pytest

from messaging.errors import InvalidMessage
from messaging.outbox.validation import (
    MAX_HEADER_DEPTH,
    check_short_string,
    clean_properties,
    decode_body,
    validate_message,
)


def valid(**overrides) -> None:
    """`validate_message` of a letter that is fine but for `overrides`."""
    fields = {"exchange": "", "routing_key": "q", "body": b"hello", "headers": {}, "exchange_type": ""}
    validate_message(**{**fields, **overrides})


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"t": value}
    return value


# --- short strings ----------------------------------------------------------------------------
def test_a_short_string_is_counted_in_utf8_bytes():
    check_short_string("é" * 127 + "a", field="The routing key")  # 255 bytes
    with pytest.raises(InvalidMessage, match=r"^The routing key is longer than 255 bytes \(UTF-8\)\.$"):
        check_short_string("é" * 128, field="The routing key")  # 128 characters, 256 bytes


def test_a_short_string_with_nul_or_a_lone_surrogate_is_refused():
    with pytest.raises(InvalidMessage, match="The exchange name contains a NUL character"):
        check_short_string("ex\x00", field="The exchange name")
    with pytest.raises(InvalidMessage, match="is not valid Unicode text"):
        check_short_string("\ud800", field="The routing key")


# --- validate_message ---------------------------------------------------------------------------
def test_a_plain_letter_passes():
    valid()
    valid(exchange="orders", routing_key="", exchange_type="topic")  # a fanout-like empty key is fine
    valid(exchange="amq.direct", routing_key="k")  # publishing to an existing amq.* exchange is allowed


@pytest.mark.parametrize("overrides, message", [
    ({"exchange": "x" * 256}, "The exchange name is longer than 255 bytes"),
    ({"routing_key": "q\x00"}, "The routing key contains a NUL character"),
    ({"exchange": "amq.fanout", "exchange_type": "fanout"}, "reserved by RabbitMQ"),
    ({"exchange": "e", "exchange_type": "x-weird"}, "Unknown exchange type 'x-weird'"),
    ({"exchange": "", "routing_key": ""}, "A queue name (routing key) is needed on the default exchange"),
    ({"headers": ["not", "a", "table"]}, "Headers must be an object"),
])
def test_what_the_broker_would_refuse_is_refused_with_a_clear_sentence(overrides, message):
    with pytest.raises(InvalidMessage) as refused:
        valid(**overrides)
    assert message in str(refused.value)


def test_the_body_limit_comes_from_the_setting(settings):
    settings.MAILROOM_MAX_BODY_BYTES = 10
    valid(body=b"x" * 10)
    with pytest.raises(InvalidMessage, match="The body is 11 bytes; the limit is 10 bytes"):
        valid(body=b"x" * 11)


def test_header_numbers_must_fit_64_bits():
    valid(headers={"min": -2**63, "max": 2**63 - 1, "flag": True})
    for number in (2**63, -2**63 - 1):
        with pytest.raises(InvalidMessage, match="does not fit in 64 bits"):
            valid(headers={"n": number})
    with pytest.raises(InvalidMessage, match="64 bits"):
        valid(headers={"deep": [{"n": 2**64}]})


def test_header_numbers_must_be_finite():
    for number in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidMessage, match="finite"):
            valid(headers={"n": number})


def test_header_text_with_nul_or_a_lone_surrogate_is_refused():
    with pytest.raises(InvalidMessage, match="NUL character"):
        valid(headers={"h": "a\x00b"})
    with pytest.raises(InvalidMessage, match="not valid Unicode"):
        valid(headers={"h": ["ok", "\udfff"]})


def test_header_names_are_short_strings():
    valid(headers={"h" * 255: 1})
    with pytest.raises(InvalidMessage, match="Header name 'hhh"):
        valid(headers={"h" * 256: 1})


def test_header_tables_are_nested_at_most_ten_deep():
    valid(headers={"t": nested(MAX_HEADER_DEPTH - 1)})
    with pytest.raises(InvalidMessage, match="nested too deeply"):
        valid(headers={"t": nested(MAX_HEADER_DEPTH + 1)})


def test_header_values_of_other_types_are_refused():
    with pytest.raises(InvalidMessage, match="Unsupported header value type set"):
        valid(headers={"s": {1, 2}})


def test_headers_too_large_for_a_frame_are_refused_before_writing():
    with pytest.raises(InvalidMessage, match=r"^Headers take [\d,]+ bytes once encoded"):
        valid(headers={"big": "x" * 200_000})


# --- clean_properties ---------------------------------------------------------------------------
def test_clean_properties_keeps_valid_ones_and_drops_empty_ones():
    assert clean_properties({"priority": 0, "expiration": 60000, "timestamp": 1700000000, "reply_to": "r",
                             "type": "", "app_id": None}) == {
        "priority": 0, "expiration": "60000", "timestamp": 1700000000, "reply_to": "r"}
    assert clean_properties(None) == {}


@pytest.mark.parametrize("properties, message", [
    ({"priority": 256}, "priority must be a whole number from 0 to 255"),
    ({"priority": True}, "priority must be a whole number"),
    ({"priority": "5"}, "priority must be a whole number"),
    ({"timestamp": -1}, "timestamp must be a whole number of seconds"),
    ({"timestamp": 2**63}, "timestamp must be a whole number of seconds"),
    ({"expiration": "1.5"}, "expiration must be a whole number of milliseconds"),
    ({"expiration": "٣٠"}, "expiration must be a whole number of milliseconds"),  # digits, not ASCII ones
    ({"reply_to": 5}, "reply_to must be text"),
    ({"user_id": "u\x00"}, "user_id contains a NUL character"),
    ({"delivery": "now"}, "Unknown property 'delivery'; known: priority, reply_to"),
])
def test_clean_properties_refuses_what_amqp_cannot_carry(properties, message):
    with pytest.raises(InvalidMessage) as refused:
        clean_properties(properties)
    assert message in str(refused.value)


# --- decode_body --------------------------------------------------------------------------------
def test_decode_body_reads_text_and_base64():
    binary = bytes(range(256))
    encoded = base64.b64encode(binary).decode()
    assert decode_body(encoded[:40] + "\n " + encoded[40:], encoding="base64") == binary  # whitespace ignored
    assert decode_body("héllo", encoding="string") == "héllo".encode()
    assert decode_body("plain", encoding="") == b"plain"


def test_decode_body_refuses_bad_base64_unknown_encodings_and_surrogates():
    with pytest.raises(InvalidMessage, match="The body is not valid base64"):
        decode_body("abc!", encoding="base64")
    with pytest.raises(InvalidMessage, match="'string' or 'base64'"):
        decode_body("00ff", encoding="hex")
    with pytest.raises(InvalidMessage, match="The body is not valid Unicode text"):
        decode_body("\ud83d", encoding="string")
