"""messaging.amqp.stored: every value pika decodes survives the database's JSON and comes back as it was."""
from __future__ import annotations

import datetime as dt
import decimal
import json
import struct

import pika.data
import pytest

from messaging.amqp.codec import PIKA_DECODE_VALUE, _encode_value
from messaging.amqp.stored import DOUBLES, PLAIN, FarTimestamp, NotDecoded, from_json, to_json

UTC = dt.UTC

# Edge cases enumerated by hand, as a property-based test would look for them.
EDGE_VALUES = [
    "", "plain", "é ü 日本", "a\x00b", "\x00", "\x00\x00", "trailing\x00", "a\\u0000b", "\\u0000", "$bytes",
    "(not decoded: looks like a note)", "$b64:x",
    b"", b"\x00\xff", b"caf\xc3\xa9", b"\x00" * 3,
    0, 1, -1, 2**31 - 1, -2**31, 2**31, 2**63 - 1, -2**63, True, False, None,
    0.0, -0.0, 1.5, -0.125, 0.1, 1e16, 1e300, 1e-300, 5e-324, 1.7976931348623157e308,
    decimal.Decimal("1.23"), decimal.Decimal("-0.001"), decimal.Decimal("12.50"), decimal.Decimal("0"),
    decimal.Decimal("2147483647"), decimal.Decimal("1E-255"),
    dt.datetime(1970, 1, 1, tzinfo=UTC), dt.datetime(2024, 5, 1, 12, 30, 5, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), FarTimestamp(253_402_300_800 + 86_400),
    [], [1, "a", None, True, b"\x00", decimal.Decimal("1.5"), [[]], {"k": "v"}],
    {}, {"k": "v"}, {"$bytes": "x"}, {"$table": {"$bytes": "x"}}, {"$base64": "AA=="}, {"$decimal": 1, "other": 2},
    {b"\xff\xfe": 1}, {"k\x00ey": "v"}, {"a\\u0000b": 1}, {"$b64:aGk=": "looks encoded"}, {"": None},
    {"nested": {"deeper": {"deepest": [{"$nul_joined": ["a"]}]}}},
]


def through_the_database(value):
    """`value` stored as the consumer stores it and read back, as JSON text (what both databases keep)."""
    text = json.dumps(to_json(value))
    assert "\\u0000" not in text.replace("\\\\u0000", "")  # PostgreSQL's jsonb refuses NUL
    return from_json(json.loads(text), external=True)


def same(a, b) -> bool:
    """Equal, and of the same kinds all the way down (1 == 1.0 == True in Python, not on the wire)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b and str(a) == str(b)


@pytest.mark.parametrize("value", EDGE_VALUES, ids=repr)
def test_every_value_comes_back_as_it_was(value):
    assert same(value, through_the_database(value))
    assert same({"h": value}, through_the_database({"h": value}))  # and as a header


def test_a_copy_sends_exactly_the_bytes_of_the_original_table():
    original = {"x": b"\x00\xff", "s": "a\x00b", b"\xff": 1, "d": decimal.Decimal("1.23"), "f": 1.5,
                "t": dt.datetime(2024, 5, 1, tzinfo=UTC), "far": FarTimestamp(10**12), "l": [1, {"n": None}]}
    stored = json.loads(json.dumps(to_json(original, floats=DOUBLES)))
    assert encoded(from_json(stored)) == encoded(original)  # a copy's row is read without `external`


def encoded(table) -> bytes:
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, table)
    return b"".join(pieces)


def test_floats_are_numbers_tags_only_when_json_would_change_them():
    assert to_json({"f": 1.5, "big": 1e300}) == {"f": 1.5, "big": {"$double": "1e+300"}}
    assert to_json({"f": 1.5}, floats=DOUBLES) == {"f": {"$double": "1.5"}}
    assert to_json({"f": 1e300}, floats=PLAIN) == {"f": 1e300}  # a letter's float: published as a decimal
    assert from_json({"f": 1.5}) == {"f": decimal.Decimal("1.5")}
    assert from_json({"f": 1.5}, external=True) == {"f": 1.5}


def test_a_producers_table_that_looks_like_a_tag_is_wrapped():
    assert to_json({"$bytes": "x"}) == {"$table": {"$bytes": "x"}}
    assert to_json({"$table": 1}) == {"$table": {"$table": 1}}
    assert to_json({"$bytes": "x", "y": 1}) == {"$bytes": "x", "y": 1}  # two keys: no tag


def test_names_that_json_cannot_hold_are_base64():
    assert to_json({b"\xff\xfe": 1, "n\x00": 2, "$b64:x": 3}) == {"$b64://4=": 1, "$b64:bgA=": 2, "$b64:JGI2NDp4": 3}
    assert from_json({"$b64:aGk=": 1}) == {"hi": 1}  # UTF-8 names come back as text, as pika decodes them
    assert from_json({"$b64:not base64!": 1}) == {"$b64:not base64!": 1}


def test_rows_of_earlier_versions_are_restored_and_what_is_uncertain_is_named():
    notes: list[str] = []
    stored = {"nul": "a\\u0000b", "k\\u0000": 1, "bin": {"$base64": "AP8="}, "deep": "(not decoded: nested deeper)"}
    assert from_json(stored, external=True, notes=notes, where="headers") == {
        "nul": "a\x00b", "k\x00": 1, "bin": b"\x00\xff", "deep": "(not decoded: nested deeper)"}
    assert len(notes) == 3 and notes[0].startswith("headers['nul'] was recorded with NUL characters")
    assert "the name 'k\\\\u0000' in headers" in notes[1] and notes[2].startswith("headers['deep'] was not decoded")
    # A letter of Mailroom's own never held those markers: its text and tables are what the user wrote.
    assert from_json(stored, notes=notes) == stored and len(notes) == 3


def test_a_value_left_undecoded_is_named_and_sent_as_its_note():
    notes: list[str] = []
    stored = to_json({"t": NotDecoded("(not decoded: nested deeper than 64 levels, 9 bytes)")})
    assert stored == {"t": {"$not_decoded": "(not decoded: nested deeper than 64 levels, 9 bytes)"}}
    assert from_json(stored, notes=notes, where="headers") == {
        "t": "(not decoded: nested deeper than 64 levels, 9 bytes)"}
    assert notes and notes[0].startswith("headers['t'] was not decoded")


def test_a_malformed_tag_is_named_and_kept_as_a_table():
    notes: list[str] = []
    assert from_json({"x": {"$decimal": "not a number"}}, notes=notes, where="headers") == {
        "x": {"$decimal": "not a number"}}
    assert "malformed $decimal" in notes[0]


def test_doubles_and_far_timestamps_are_encoded_as_such():
    pieces: list[bytes] = []
    assert _encode_value(pieces, 1.5) == 9 and pieces == [b"d" + struct.pack(">d", 1.5)]
    pieces = []
    assert _encode_value(pieces, FarTimestamp(2**40)) == 9 and pieces == [b"T" + struct.pack(">Q", 2**40)]
    assert PIKA_DECODE_VALUE(b"d" + struct.pack(">d", 1.5), 0) == (1, 9)  # what a plain pika consumer reads
