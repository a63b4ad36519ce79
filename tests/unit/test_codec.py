"""messaging.amqp.codec: headers and properties between AMQP, pika and the database."""
from __future__ import annotations

import datetime as dt
import decimal
import struct
from types import SimpleNamespace

import pika
import pika.data
import pika.spec
import pytest

from messaging.amqp import codec
from messaging.amqp.codec import (
    MAX_DECODED_DEPTH,
    MAX_HEADERS_BYTES,
    _decode_value,
    build_properties,
    check_frame_size,
    header_encoding_error,
    install_header_decoding,
    json_safe,
    read_properties,
    text_value,
)
from messaging.errors import FrameTooLarge, InvalidMessage


def row(**fields) -> SimpleNamespace:
    """What `build_properties` reads of a `Message` row."""
    base = {"message_id": "m-1", "content_type": "", "content_encoding": "", "correlation_id": "",
            "delivery_mode": 2, "headers": {}, "properties": {}}
    return SimpleNamespace(**{**base, **fields})


def through_the_wire(properties: pika.BasicProperties) -> pika.BasicProperties:
    """`properties` encoded as pika sends them and decoded as a consumer receives them."""
    received = pika.spec.BasicProperties()
    received.decode(b"".join(properties.encode()))
    return received


# --- json_safe / text_value -------------------------------------------------------------------
def test_json_safe_stores_every_amqp_value_as_json_with_tags():
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    value = {
        "text": "plain", "utf8": "é".encode(), "binary": b"\xff\x00\xfe", "when": when,
        "day": dt.date(2024, 5, 1), "amount": decimal.Decimal("12.50"), "tuple": (1, b"a"),
        "n": 7, "ok": True, "f": 1.5, "none": None, 3: "int key",
    }
    assert json_safe(value) == {
        "text": "plain", "utf8": {"$bytes": "w6k="}, "binary": {"$bytes": "/wD+"},
        "when": {"$timestamp": "2024-05-01T12:30:00+00:00"}, "day": "2024-05-01", "amount": {"$decimal": "12.50"},
        "tuple": [1, {"$bytes": "YQ=="}], "n": 7, "ok": True, "f": 1.5, "none": None, "$b64:Mw==": "int key",
    }


def test_json_safe_stores_nul_everywhere_without_the_character_postgresql_refuses():
    assert json_safe({"k\x00ey": ["a\x00b", b"c\x00d"]}) == {
        "$b64:awBleQ==": [{"$nul_joined": ["a", "b"]}, {"$bytes": "YwBk"}]}


def test_json_safe_writes_an_unknown_object_as_its_repr():
    class Odd:
        def __repr__(self) -> str:
            return "<odd\x00>"

    assert json_safe(Odd()) == {"$nul_joined": ["<odd", ">"]}


def test_text_value_decodes_invalid_utf8_with_replacement_and_escapes_nul():
    assert text_value(b"caf\xc3\xa9") == "café"
    assert text_value(b"bad\xff") == "bad\ufffd"
    assert text_value("a\x00b") == "a\\u0000b"
    assert text_value(5) == "5"


# --- build_properties / read_properties --------------------------------------------------------
def test_properties_round_trip_through_pika_encoding():
    message = row(
        content_type="application/json", content_encoding="gzip", correlation_id="c-9", delivery_mode=1,
        headers={"n": 1, "ok": True, "nested": {"list": [1, "a"]}},
        properties={"priority": 5, "reply_to": "answers", "expiration": "60000", "timestamp": 1700000000,
                    "type": "", "app_id": None, "not-a-property": "ignored"},
    )
    sent = build_properties(message)
    assert sent.message_id == "m-1" and sent.type is None and sent.app_id is None  # empty ones are left out
    fields = read_properties(through_the_wire(sent))
    assert fields == {
        "content_type": "application/json", "content_encoding": "gzip", "correlation_id": "c-9", "delivery_mode": 1,
        "headers": {"n": 1, "ok": True, "nested": {"list": [1, "a"]}},
        "properties": {"priority": 5, "reply_to": "answers", "expiration": "60000", "timestamp": 1700000000},
    }


def test_float_headers_travel_as_decimals_and_are_stored_as_decimals():
    sent = build_properties(row(headers={"rate": 2.5, "deep": [{"x": 0.1}]}))
    assert sent.headers == {"rate": decimal.Decimal("2.5"), "deep": [{"x": decimal.Decimal("0.1")}]}
    assert read_properties(through_the_wire(sent))["headers"] == {
        "rate": {"$decimal": "2.5"}, "deep": [{"x": {"$decimal": "0.1"}}]}


def test_read_properties_defaults_for_a_bare_message():
    fields = read_properties(pika.BasicProperties())
    assert fields == {"content_type": "", "content_encoding": "", "correlation_id": "", "delivery_mode": 1,
                      "headers": {}, "properties": {}}


def test_read_properties_cuts_a_long_correlation_id_to_the_column():
    assert len(read_properties(pika.BasicProperties(correlation_id="c" * 300))["correlation_id"]) == 255


# --- header_encoding_error / check_frame_size --------------------------------------------------
def test_header_encoding_error_is_empty_for_headers_pika_can_send():
    assert header_encoding_error({"n": 2**63 - 1, "f": 0.5, "t": "x", "l": [None, True]}) == ""


def test_header_encoding_error_names_numbers_beyond_64_bits():
    problem = header_encoding_error({"n": 2**64})
    assert problem.startswith("headers cannot be encoded in AMQP") and "64 bits" in problem


def test_header_encoding_error_refuses_headers_larger_than_a_frame():
    problem = header_encoding_error({"big": "x" * MAX_HEADERS_BYTES})
    assert "bytes once encoded" in problem and f"{MAX_HEADERS_BYTES:,}" in problem


def test_check_frame_size_passes_small_properties_and_refuses_oversized_ones():
    check_frame_size(pika.BasicProperties(headers={"a": "b"}), 131_072)  # no exception
    check_frame_size(pika.BasicProperties(), 4096)
    big = pika.BasicProperties(headers={"big": "x" * 10_000})
    with pytest.raises(FrameTooLarge, match="frame_max") as refused:
        check_frame_size(big, 8192)
    assert isinstance(refused.value, InvalidMessage)


# --- the header decoder ----------------------------------------------------------------------
def test_install_header_decoding_replaces_pikas_decoder_once():
    install_header_decoding()
    install_header_decoding()
    assert pika.data.decode_value is _decode_value


def test_doubles_and_floats_are_decoded_as_floats():
    assert _decode_value(b"d" + struct.pack(">d", 1.5), 0) == (1.5, 9)
    assert _decode_value(b"f" + struct.pack(">f", -0.25), 0) == (-0.25, 5)
    install_header_decoding()
    table = b"\x04rate" + b"d" + struct.pack(">d", 2.75)  # nested values come back through the module attribute
    assert pika.data.decode_table(struct.pack(">I", len(table)) + table, 0) == ({"rate": 2.75}, 4 + len(table))


def test_timestamps_are_datetimes_and_those_past_9999_stay_numbers():
    in_range = b"T" + struct.pack(">Q", 1_700_000_000)
    assert _decode_value(in_range, 0) == (dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC), 9)
    far = 253_402_300_800 + 86_400  # a day into the year 10000
    assert _decode_value(b"T" + struct.pack(">Q", far), 0) == (far, 9)


def test_tables_nested_past_the_bound_are_skipped_not_decoded():
    install_header_decoding()
    value: dict = {"leaf": 1}
    for _ in range(MAX_DECODED_DEPTH + 5):
        value = {"t": value}
    encoded: list[bytes] = []
    pika.data.encode_table(encoded, {"root": value})
    decoded, offset = pika.data.decode_table(b"".join(encoded), 0)
    assert offset == len(b"".join(encoded))  # the skipped part is still consumed whole
    depth, node = 0, decoded["root"]
    while isinstance(node, dict):
        node, depth = node["t"], depth + 1
    assert isinstance(node, str) and node.startswith(f"(not decoded: nested deeper than {MAX_DECODED_DEPTH} levels")
    assert depth == MAX_DECODED_DEPTH  # tables within the bound are decoded as tables
    assert getattr(codec._decoding, "depth", 0) == 0  # the depth is unwound after decoding


def test_other_kinds_are_left_to_pika():
    encoded: list[bytes] = []
    pika.data.encode_table(encoded, {"s": "text", "n": 5, "b": True, "l": [1, "x"]})
    assert pika.data.decode_table(b"".join(encoded), 0)[0] == {"s": "text", "n": 5, "b": True, "l": [1, "x"]}
