"""Checking a message before anything is written: what the broker or the database would refuse."""
from __future__ import annotations

import base64
import binascii
from typing import Any

from messaging import conf
from messaging.amqp.codec import (
    EXCHANGE_TYPES,
    MAX_SHORTSTR_BYTES,
    header_encoding_error,
)
from messaging.errors import InvalidMessage

# The standard AMQP properties a publisher may set besides message_id, content_type,
# content_encoding, correlation_id and delivery_mode (which have their own fields).
PROPERTY_FIELDS = ("priority", "reply_to", "expiration", "timestamp", "type", "user_id", "app_id")


def check_short_string(value: str, *, field: str) -> None:
    """At most 255 bytes of UTF-8 (an AMQP short string), and text a database can store (no NUL)."""
    if "\x00" in value:
        raise InvalidMessage(f"{field} contains a NUL character.")
    if len(utf8(value, field=field)) > MAX_SHORTSTR_BYTES:
        raise InvalidMessage(f"{field} is longer than {MAX_SHORTSTR_BYTES} bytes (UTF-8).")


def utf8(text: str, *, field: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (which JSON's \\ud800 escapes can carry) is refused clearly."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessage(f"{field} is not valid Unicode text ({exc.reason}).") from exc


def validate_message(
    *, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any], exchange_type: str = "",
) -> None:
    """Refuse what the broker would refuse, before anything is written.

    Publishing to an existing `amq.*` exchange (amq.direct, amq.topic...) is fine; declaring one is
    refused by RabbitMQ (403), so a message that asks to declare one is refused here.
    """
    check_short_string(exchange, field="The exchange name")
    check_short_string(routing_key, field="The routing key")
    if exchange.startswith("amq.") and exchange_type:
        raise InvalidMessage("Exchanges named amq.* are reserved by RabbitMQ and cannot be declared; "
                          "publish to an existing one without declaring it.")
    check_exchange_type(exchange_type)
    if not exchange and not routing_key:
        raise InvalidMessage("A queue name (routing key) is needed on the default exchange.")
    if len(body) > conf.get("MAILROOM_MAX_BODY_BYTES"):
        raise InvalidMessage(f"The body is {len(body)} bytes; the limit is {conf.get("MAILROOM_MAX_BODY_BYTES")} bytes.")
    if not isinstance(headers, dict):
        raise InvalidMessage("Headers must be an object of name: value.")
    check_header_table(headers)
    problem = header_encoding_error(headers)
    if problem:
        raise InvalidMessage(problem[0].upper() + problem[1:] + ".")


def check_exchange_type(exchange_type: str) -> None:
    if exchange_type and exchange_type not in EXCHANGE_TYPES:
        raise InvalidMessage(f"Unknown exchange type {exchange_type[:40]!r}.")


MAX_HEADER_DEPTH = 10


def check_header_table(table: dict, *, depth: int = 0) -> None:
    """Header names of at most 255 bytes; values a string, number, boolean, null, list or table,
    tables and lists nested at most `MAX_HEADER_DEPTH` deep."""
    if depth > MAX_HEADER_DEPTH:
        raise InvalidMessage("Headers are nested too deeply.")
    for key, value in table.items():
        check_short_string(str(key), field=f"Header name {str(key)[:40]!r}")
        check_header_value(value, depth=depth)


def check_header_value(value: Any, *, depth: int) -> None:
    if depth > MAX_HEADER_DEPTH:
        raise InvalidMessage("Headers are nested too deeply.")
    if isinstance(value, str):
        utf8(value, field="A header value")
        if "\x00" in value:  # PostgreSQL's JSON cannot hold it: it would be stored changed, as the text \u0000
            raise InvalidMessage("A header value contains a NUL character, which cannot be stored as it is.")
    elif isinstance(value, dict):
        check_header_table(value, depth=depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_header_value(item, depth=depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise InvalidMessage("A header number does not fit in 64 bits.")
    elif isinstance(value, float) and value - value != 0:  # json.loads reads NaN and Infinity
        raise InvalidMessage("A header number must be finite (not NaN or Infinity).")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise InvalidMessage(f"Unsupported header value type {type(value).__name__}.")


def clean_properties(properties: dict[str, Any] | None) -> dict[str, Any]:
    """The standard properties, checked (priority 0-255, expiration in ms, timestamp in seconds); empty ones dropped."""
    cleaned: dict[str, Any] = {}
    for name, value in (properties or {}).items():
        if name not in PROPERTY_FIELDS:
            raise InvalidMessage(f"Unknown property {name!r}; known: {', '.join(PROPERTY_FIELDS)}.")
        if value is None or value == "":
            continue
        if name == "priority":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise InvalidMessage("priority must be a whole number from 0 to 255.")
        elif name == "timestamp":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise InvalidMessage("timestamp must be a whole number of seconds since 1970.")
        elif name == "expiration":
            value = str(value)
            if not value.isdigit() or not value.isascii():
                raise InvalidMessage("expiration must be a whole number of milliseconds (as text), e.g. '60000'.")
            check_short_string(value, field=name)
        elif not isinstance(value, str):
            raise InvalidMessage(f"{name} must be text.")
        else:
            check_short_string(value, field=name)
        cleaned[name] = value
    return cleaned


def decode_body(text: str, *, encoding: str) -> bytes:
    """The body bytes of a form or API payload given as 'string' (UTF-8) or 'base64'."""
    if encoding == "base64":
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidMessage(f"The body is not valid base64: {exc}") from exc
    if encoding not in ("string", ""):
        raise InvalidMessage("The payload encoding must be 'string' or 'base64'.")
    return utf8(text, field="The body")
