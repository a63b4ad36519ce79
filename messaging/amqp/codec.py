"""Headers and properties between AMQP and the database: decoding, JSON-safe values, encoding checks."""
from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import struct
import threading
from typing import Any

import pika
import pika.exceptions as pe

from messaging.amqp.stored import PLAIN, FarTimestamp, NotDecoded, from_json, to_json
from messaging.errors import FrameTooLarge

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
MAX_SHORTSTR_BYTES = 255  # routing keys, exchange names and header names (AMQP short strings)
MAX_DECODED_DEPTH = 64  # header tables and arrays nested deeper than this are not decoded
_decoding = threading.local()  # the nesting depth of the table being decoded, per thread


def _decode_value(encoded: bytes, offset: int, _pika_decode_value=pika.data.decode_value):
    """pika's `decode_value`, with AMQP floats and doubles decoded as floats, and a bounded depth.

    pika 1.4 casts floats to int (pika/pika#599): a header of 1.5 from another client (kombu, Java,
    Go) was recorded as 1. Nested tables and arrays come back through here: pika's decoders look
    the name up in their module. (NaN and the infinities never arrive: RabbitMQ closes the
    publisher's connection with an internal error instead.)

    Two headers pika cannot decode make it drop the connection — again at every redelivery, a
    poison message no consumer gets past: a timestamp past the year 9999 (kept as its number of
    seconds here, a `FarTimestamp`), and tables nested a thousand deep, which one frame holds easily
    and which exhaust Python's recursion (pika decodes them recursively). Below `MAX_DECODED_DEPTH` a table or array
    is skipped (its length is in front of it) and stands as a short text saying so (a `NotDecoded`).
    """
    kind = encoded[offset:offset + 1]
    if kind == b"d":
        return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
    if kind == b"f":
        return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
    if kind == b"T":  # seconds since 1970; beyond what a datetime holds (year 10000) pika raises and drops the connection
        seconds = struct.unpack_from(">Q", encoded, offset + 1)[0]
        try:
            return dt.datetime.fromtimestamp(seconds, dt.timezone.utc), offset + 9
        except (OverflowError, ValueError, OSError):
            return FarTimestamp(seconds), offset + 9
    if kind not in (b"F", b"A"):
        return _pika_decode_value(encoded, offset)
    depth = getattr(_decoding, "depth", 0)
    if depth >= MAX_DECODED_DEPTH:
        size = struct.unpack_from(">I", encoded, offset + 1)[0]
        note = f"(not decoded: nested deeper than {MAX_DECODED_DEPTH} levels, {size} bytes)"
        return NotDecoded(note), offset + 5 + size
    _decoding.depth = depth + 1
    try:
        return _pika_decode_value(encoded, offset)
    finally:
        _decoding.depth = depth


def _encode_value(pieces: list, value, _pika_encode_value=pika.data.encode_value) -> int:
    """pika's `encode_value`, which also writes a float as an AMQP double and a `FarTimestamp` as a timestamp.

    pika 1.4 refuses floats; a letter's floats are published as decimals (`build_properties`), so a
    float reaching pika is a copy of another producer's double, sent again as one.
    """
    kind = type(value)
    if kind is float:
        pieces.append(struct.pack(">cd", b"d", value))
        return 9
    if kind is FarTimestamp:
        pieces.append(struct.pack(">cQ", b"T", value))
        return 9
    return _pika_encode_value(pieces, value)


PIKA_DECODE_VALUE = pika.data.decode_value  # pika's own, as a plain pika consumer decodes


def install_header_decoding() -> None:
    """Make pika decode and encode headers with `_decode_value` and `_encode_value` (from `MessagingConfig.ready`).

    pika's table coders look `decode_value` and `encode_value` up in `pika.data` at each call, so
    replacing those module attributes is how nested values get the fix too.
    """
    if pika.data.decode_value is not _decode_value:
        pika.data.decode_value = _decode_value
    if pika.data.encode_value is not _encode_value:
        pika.data.encode_value = _encode_value


def json_safe(value: Any) -> Any:
    """A letter's headers as stored JSON (`stored.to_json`): its floats stay numbers, published as decimals."""
    return to_json(value, floats=PLAIN)


def json_safe_str(text: str) -> str:
    """`text` without NUL, which PostgreSQL refuses in text: written as the six characters \\u0000."""
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


def text_value(value) -> str:
    """A received short string (a property, the exchange, the routing key) as storable text.

    pika hands over bytes where another producer sent invalid UTF-8: those are decoded with
    U+FFFD for the invalid bytes, and NUL is escaped as in `json_safe_str`.
    """
    if type(value) is not str:
        value = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return json_safe_str(value)


MAX_MESSAGE_ID_CHARS = 255  # `Message.message_id`'s column
ID_DIGEST_MARK = "~sha256:"  # between a changed message_id's readable text and its raw bytes' digest


def stored_message_id(value) -> tuple[str, bytes | None]:
    """A received message_id as `Message.message_id` stores it, and its raw bytes when that text is not them.

    Text that is valid UTF-8, without NUL and within the column is kept exactly. Anything else
    (pika's bytes for invalid UTF-8, NUL, too long) would lose what told two ids apart once decoded,
    escaped and cut: its readable form gets the full sha256 of the raw bytes appended, so two
    different raw ids stay two letters (a truncated digest could be collided on purpose).
    """
    if type(value) is str and len(value) <= MAX_MESSAGE_ID_CHARS and "\x00" not in value:
        return value, None
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
    digest = ID_DIGEST_MARK + hashlib.sha256(raw).hexdigest()
    return text_value(raw)[:MAX_MESSAGE_ID_CHARS - len(digest)] + digest, raw


PROPERTY_NAMES = ("priority", "reply_to", "expiration", "timestamp", "type", "user_id", "app_id", "cluster_id")


def build_properties(message) -> pika.BasicProperties:
    """The AMQP properties of a `Message` row."""
    extra = {k: from_json(v) for k, v in (message.properties or {}).items()
             if k in PROPERTY_NAMES and v not in (None, "")}
    return pika.BasicProperties(
        message_id=message.message_id,
        content_type=message.content_type or None,
        content_encoding=message.content_encoding or None,
        correlation_id=message.correlation_id or None,
        delivery_mode=message.delivery_mode or None,
        # The stored tags as pika's values; plain floats as AMQP decimals (pika encodes no float).
        headers=from_json(message.headers) if message.headers else None,
        **extra,
    )


def read_properties(properties) -> dict[str, Any]:
    """Split received `BasicProperties` into `Message` fields (headers and properties as `stored.to_json`)."""
    extra = {}
    for name in PROPERTY_NAMES:
        value = getattr(properties, name, None)
        if value is not None:
            extra[name] = to_json(value)
    return {
        "content_type": text_value(properties.content_type or ""),
        "content_encoding": text_value(properties.content_encoding or ""),
        "correlation_id": text_value(properties.correlation_id or "")[:255],
        "delivery_mode": properties.delivery_mode or 1,
        "headers": to_json(properties.headers) if properties.headers else {},
        "properties": extra,
    }


# What pika raises when a header value cannot be written as an AMQP field.
ENCODING_ERRORS = (
    pe.UnsupportedAMQPFieldException, pe.ShortStringTooLong, struct.error, OverflowError, TypeError, ValueError,
)


def header_encoding_error(headers: dict, *, floats_as_decimals: bool = True) -> str:
    """Why `headers` cannot be sent as an AMQP table ('' when they can); a letter's floats go as decimals."""
    try:
        size = pika.data.encode_table([], _floats_to_decimals(headers) if floats_as_decimals else headers)
    except ENCODING_ERRORS as exc:
        return f"headers cannot be encoded in AMQP ({exc.__class__.__name__}); numbers must fit 64 bits, " \
               "decimals at most 255 places"
    if size > MAX_HEADERS_BYTES:
        return f"headers take {size:,} bytes once encoded; at most {MAX_HEADERS_BYTES:,} fit in the AMQP frame " \
               "that carries them with the other properties"
    return ""


# The properties travel in one frame, which the broker refuses past its frame_max (131,072 bytes by
# default) by closing the connection (501 frame_too_large): every message in flight on it is lost
# with it, and the message itself would be sent again and again. The properties other than headers
# are short strings and numbers: ~4 kB at most.
OTHER_PROPERTIES_MAX_BYTES = 4096


MAX_HEADERS_BYTES = pika.spec.FRAME_MAX_SIZE - OTHER_PROPERTIES_MAX_BYTES


def check_frame_size(properties: pika.BasicProperties, frame_max: int) -> None:
    """Raise `FrameTooLarge` when `properties` would not fit in a frame of `frame_max` bytes.

    Letters written since this check reach the broker within the limit (`header_encoding_error`);
    this catches older rows and copies of received messages whose headers grew as JSON. Headers
    under the margin are taken as they are: encoding their table costs ~2 µs, the whole frame ~6.
    """
    headers = properties.headers
    if not headers or pika.data.encode_table([], headers) + OTHER_PROPERTIES_MAX_BYTES <= frame_max:
        return
    size = len(pika.frame.Header(1, 0, properties).marshal())
    if size > frame_max:
        raise FrameTooLarge(f"its properties take {size:,} bytes in their AMQP frame; the broker takes at most "
                            f"{frame_max:,} (frame_max)")


def _floats_to_decimals(value):
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _floats_to_decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_to_decimals(v) for v in value]
    return value
