"""Header and property values between pika and the database's JSON: a lossless, tagged encoding.

JSON has no bytes, decimals or timestamps, PostgreSQL's jsonb refuses NUL, and reads a number
such as 1e+300 back as an integer. Each value JSON cannot hold as it is is stored as an object of
one key naming its kind, and `from_json` gives back exactly what pika decoded:

    {"$bytes": "<base64>"}          a byte array, or a long string that is not UTF-8
    {"$decimal": "1.23"}            an AMQP decimal
    {"$timestamp": "<ISO 8601>"}    an AMQP timestamp (past the year 9999: its number of seconds)
    {"$double": "1e+300"}           an AMQP double JSON would not give back as a float, and every double of a copy
    {"$nul_joined": ["a", "b"]}     text holding NUL (or the six characters \\u0000): its parts between NULs
    {"$not_decoded": "..."}         what the consumer left undecoded (tables nested too deep): a note
    {"$table": {...}}               a table that looks like one of these (a producer's {"$bytes": "x"})

A plain float is a received AMQP double, or in a letter Mailroom publishes an AMQP decimal (pika
sends no float). A header name that is not UTF-8, holds NUL or the text \\u0000, or starts with "$b64:" is stored as
"$b64:<base64 of its bytes>". Rows recorded before this encoding (NUL as the text \\u0000, bytes
as {"$base64": ...}) are read with `external=True`, which says what it could not restore exactly.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
from typing import Any

KEY_PREFIX = "$b64:"
NUL_TEXT = "\\u0000"  # how earlier versions stored NUL (PostgreSQL refuses the character itself)
NOT_DECODED_PREFIX = "(not decoded: "
# Tags, and the marker earlier versions wrote for bytes: a producer's table of one such key is wrapped.
TAGS = frozenset({"$bytes", "$decimal", "$timestamp", "$double", "$nul_joined", "$not_decoded", "$table",
                  "$base64"})

# How `to_json` stores a float: as it is (a Mailroom letter's float, published as an AMQP decimal),
# tagged when JSON would not give it back as a float (a received AMQP double), or always tagged (a
# copy of a received message, whose plain floats would otherwise be published as decimals).
PLAIN, RECEIVED, DOUBLES = "plain", "received", "doubles"


class FarTimestamp(int):
    """An AMQP timestamp past the year 9999 (no datetime holds it): its number of seconds since 1970."""


class NotDecoded(str):
    """A note standing for a header value the consumer did not decode."""


def to_json(value: Any, *, floats: str = RECEIVED) -> Any:
    """A value pika decoded (a header table, a property) as JSON that `from_json` turns back into it."""
    if type(value) is dict and _plain(value):  # checked once, at the top: a subtree is never scanned twice
        return value
    return _stored(value, floats)


def _stored(value: Any, floats: str) -> Any:
    kind = type(value)  # the common types first, by exact type: the consumer stores every header
    if kind is str:
        return value if "\x00" not in value and NUL_TEXT not in value else {"$nul_joined": value.split("\x00")}
    if kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        table = {k if type(k) is str and "\x00" not in k and k[:1] != "$" and NUL_TEXT not in k else _key(k):
                 _stored(v, floats) for k, v in value.items()}
        return {"$table": table} if len(table) == 1 and next(iter(table)) in TAGS else table
    if kind is list or kind is tuple:
        return [_stored(v, floats) for v in value]
    if kind is float:
        if floats == PLAIN or (floats == RECEIVED and value - value == 0 and "e+" not in repr(value)):
            return value
        return {"$double": repr(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, dt.datetime):
        return {"$timestamp": value.isoformat()}
    if isinstance(value, FarTimestamp):
        return {"$timestamp": int(value)}
    if isinstance(value, NotDecoded):
        return {"$not_decoded": str(value)}
    if isinstance(value, dt.date):
        return value.isoformat()
    for plain in (str, int, float, dict, list):  # a subclass (an OrderedDict, say) as the plain type
        if isinstance(value, plain):
            return _stored(plain(value), floats)
    return _stored(repr(value), floats)


def _plain(table: dict) -> bool:
    """Whether `table` is stored as it is: text, whole numbers and tables or lists of them, under names
    no tag or escape touches (the common case, checked without building a copy)."""
    for key, value in table.items():
        if type(key) is not str or "\x00" in key or "\\" in key or key[:1] == "$" or not _plain_value(value):
            return False
    return True


def _plain_value(value) -> bool:
    kind = type(value)
    if kind is str:
        return "\x00" not in value and "\\" not in value
    if kind is int or kind is bool or value is None:
        return True
    if kind is dict:
        return _plain(value)  # a table that looks like a tag has a name starting with "$": not plain
    if kind is list:
        return all(_plain_value(item) for item in value)
    return False


def _key(key) -> str:
    if type(key) is str and "\x00" not in key and NUL_TEXT not in key and not key.startswith(KEY_PREFIX):
        return key
    raw = key if isinstance(key, bytes) else str(key).encode("utf-8", "surrogatepass")
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def from_json(value: Any, *, external: bool = False, notes: list[str] | None = None, where: str = "") -> Any:
    """The value `to_json` stored, as pika encodes it; what cannot be restored exactly is named in `notes`.

    `external`: the row is another producer's message, whose plain floats were AMQP doubles and
    which may have been recorded before this encoding. Otherwise plain floats are published as
    decimals (how Mailroom sends a letter's floats) and markers of earlier versions are plain text.
    """
    kind = type(value)
    if kind is str:
        if external and (NUL_TEXT in value or value.startswith(NOT_DECODED_PREFIX)):
            return _legacy_text(value, notes, where)
        return value
    if kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if external else decimal.Decimal(repr(value))
    if kind is list:
        return [from_json(v, external=external, notes=notes, where=f"{where}[{i}]" if notes is not None else "")
                for i, v in enumerate(value)]
    if kind is not dict:
        return value
    if len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag in TAGS and (tag != "$base64" or external):
            return _tagged(tag, inner, external=external, notes=notes, where=where)
    return _table(value, external=external, notes=notes, where=where)


def _table(value: dict, *, external: bool, notes: list[str] | None, where: str) -> dict:
    table = {}
    for key, item in value.items():
        name = _name(key, external=external, notes=notes, where=where)
        inner = f"{where}[{name!r}]" if notes is not None else ""
        table[name] = from_json(item, external=external, notes=notes, where=inner)
    return table


def _name(key: str, *, external: bool, notes: list[str] | None, where: str):
    if key.startswith(KEY_PREFIX):
        try:
            raw = base64.b64decode(key[len(KEY_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            return key
        try:
            return raw.decode("utf-8")  # as pika decodes a name: text when it is UTF-8
        except UnicodeDecodeError:
            return raw
    if external and NUL_TEXT in key:
        return _legacy_text(key, notes, f"the name {key!r} in {where}")
    return key


def _tagged(tag: str, inner: Any, *, external: bool, notes: list[str] | None, where: str) -> Any:
    try:
        if tag == "$table":
            return _table(inner, external=external, notes=notes, where=where)
        if tag in ("$bytes", "$base64"):
            return base64.b64decode(inner, validate=True)
        if tag == "$decimal":
            return decimal.Decimal(inner)
        if tag == "$double":
            return float(inner)
        if tag == "$timestamp":
            return FarTimestamp(inner) if type(inner) is int else dt.datetime.fromisoformat(inner)
        if tag == "$nul_joined":
            return "\x00".join(inner)
        _note(notes, where, f"was not decoded when it was received ({inner}); the copy carries that note as text")
        return str(inner)
    except (TypeError, ValueError, AttributeError, binascii.Error, decimal.InvalidOperation):
        _note(notes, where, f"holds a malformed {tag} value; it is sent as it is stored")
        return _table({tag: inner}, external=external, notes=None, where=where)


def _legacy_text(text: str, notes: list[str] | None, where: str) -> str:
    if text.startswith(NOT_DECODED_PREFIX):
        _note(notes, where, "was not decoded when it was received; the copy carries that note as text")
        return text
    _note(notes, where, f"was recorded with NUL characters written as the text {NUL_TEXT} (by an earlier version); "
                        "the copy sends NUL characters there")
    return text.replace(NUL_TEXT, "\x00")


def _note(notes: list[str] | None, where: str, text: str) -> None:
    if notes is not None:
        notes.append(f"{where or 'the value'} {text}")
