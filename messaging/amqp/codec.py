"""Headers and properties between AMQP and the database: decoding, JSON-safe values, encoding checks."""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import struct
import threading
from typing import Any

import pika
import pika.exceptions as pe

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
    seconds here), and tables nested a thousand deep, which one frame holds easily and which exhaust
    Python's recursion (pika decodes them recursively). Below `MAX_DECODED_DEPTH` a table or array
    is skipped (its length is in front of it) and stands as a short text saying so.
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
            return seconds, offset + 9
    if kind not in (b"F", b"A"):
        return _pika_decode_value(encoded, offset)
    depth = getattr(_decoding, "depth", 0)
    if depth >= MAX_DECODED_DEPTH:
        size = struct.unpack_from(">I", encoded, offset + 1)[0]
        return f"(not decoded: nested deeper than {MAX_DECODED_DEPTH} levels, {size} bytes)", offset + 5 + size
    _decoding.depth = depth + 1
    try:
        return _pika_decode_value(encoded, offset)
    finally:
        _decoding.depth = depth


def install_header_decoding() -> None:
    """Make pika decode headers with `_decode_value` (called once from `MessagingConfig.ready`).

    pika's table decoders look `decode_value` up in `pika.data` at each call, so replacing that
    module attribute is how nested values get the fix too.
    """
    if pika.data.decode_value is not _decode_value:
        pika.data.decode_value = _decode_value


def json_safe(value: Any) -> Any:
    """An AMQP table value as JSON (bytes as text or base64, datetimes ISO, decimals as strings).

    PostgreSQL refuses NUL in JSON text, so NUL characters are escaped as the text '\\u0000'.
    """
    kind = type(value)  # the common types first, by exact type: the consumer reads every header
    if kind is str:
        return json_safe_str(value)
    if kind in _JSON_SCALARS:
        return value
    if isinstance(value, dict):
        return {json_safe_str(k if type(k) is str else str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        try:
            return json_safe_str(value.decode("utf-8"))
        except UnicodeDecodeError:
            return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, str):
        return json_safe_str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return json_safe_str(repr(value))


_JSON_SCALARS = frozenset({int, bool, float, type(None)})


def json_safe_str(text: str) -> str:
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
    extra = {k: v for k, v in (message.properties or {}).items() if k in PROPERTY_NAMES and v not in (None, "")}
    return pika.BasicProperties(
        message_id=message.message_id,
        content_type=message.content_type or None,
        content_encoding=message.content_encoding or None,
        correlation_id=message.correlation_id or None,
        delivery_mode=message.delivery_mode or None,
        # pika cannot encode a float: fractions travel as AMQP decimals.
        headers=(_floats_to_decimals(message.headers) if _has_float(message.headers) else message.headers) or None,
        **extra,
    )


def read_properties(properties) -> dict[str, Any]:
    """Split received `BasicProperties` into `Message` fields (JSON-safe)."""
    extra = {}
    for name in PROPERTY_NAMES:
        value = getattr(properties, name, None)
        if value is not None:
            extra[name] = json_safe(value)
    return {
        "content_type": text_value(properties.content_type or ""),
        "content_encoding": text_value(properties.content_encoding or ""),
        "correlation_id": text_value(properties.correlation_id or "")[:255],
        "delivery_mode": properties.delivery_mode or 1,
        "headers": json_safe(properties.headers or {}),
        "properties": extra,
    }


# What pika raises when a header value cannot be written as an AMQP field.
ENCODING_ERRORS = (
    pe.UnsupportedAMQPFieldException, pe.ShortStringTooLong, struct.error, OverflowError, TypeError, ValueError,
)


def header_encoding_error(headers: dict) -> str:
    """Why `headers` cannot be sent as an AMQP table ('' when they can)."""
    try:
        size = pika.data.encode_table([], _floats_to_decimals(headers))
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


def _has_float(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def _floats_to_decimals(value):
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _floats_to_decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_to_decimals(v) for v in value]
    return value
