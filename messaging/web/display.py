"""How the pages and the admin show a time, a JSON value and a body preview: plain text, escaped by whoever renders it."""
from __future__ import annotations

import json
from datetime import datetime

from django.utils import dateformat, timezone

# Every time shown: to the second, with the active time zone's name (the templates use the same
# string with the `date` filter, which converts to the active zone first).
TIME_FORMAT = "Y-m-d H:i:s T"

# A body preview in a list: this many characters of a text body.
PREVIEW_CHARS = 80
# Bytes read from the database for a preview: enough for PREVIEW_CHARS characters of 4 bytes each.
PREVIEW_BYTES = 4 * PREVIEW_CHARS


def shown_time(value: datetime | None) -> str:
    """`value` in the active time zone as TIME_FORMAT, or '—' when there is none."""
    if value is None:
        return "—"
    return dateformat.format(timezone.localtime(value) if timezone.is_aware(value) else value, TIME_FORMAT)


def _not_json(value) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return f"<{len(data)} bytes: {data[:32].hex(' ')}{' …' if len(data) > 32 else ''}>"
    return f"<{value.__class__.__name__}: {value!r}>"


def pretty_json(value) -> str:
    """`value` as indented JSON (keys sorted); what is not JSON (bytes, say) as a readable stand-in string."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=_not_json)


def body_preview(prefix: bytes, *, size: int, chars: int = PREVIEW_CHARS) -> str:
    """The first `chars` characters of a text body from its first bytes, or 'binary, N bytes'.

    `prefix` is the body's start (PREVIEW_BYTES of it, read by the database); `size` the whole body's.
    """
    if not size:
        return "empty"
    try:
        text = prefix.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A character cut where the prefix ends is still text; anything else is binary.
        cut = len(prefix) < size and exc.reason == "unexpected end of data" and exc.start >= len(prefix) - 3
        text = prefix[:exc.start].decode("utf-8") if cut else None
    if text is None or "\x00" in text:
        return f"binary, {size:,} bytes"
    shown = " ".join(text.split())  # one line: newlines and runs of spaces as one space
    return shown[:chars] + "…" if len(shown) > chars or len(prefix) < size else shown


def body_part(part: bytes, *, size: int) -> dict:
    """How to show a body from its first bytes `part` (the whole body is `size` bytes): as text, escaped
    by whoever renders it, or as a hex preview when it is binary."""
    try:
        text = part.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A character cut where the part ends is still text; anything else is binary.
        cut = len(part) < size and exc.reason == "unexpected end of data" and exc.start >= len(part) - 3
        text = part[:exc.start].decode("utf-8") if cut else None
    binary = text is None or "\x00" in text
    return {"binary": binary, "text": "" if binary else text, "size": size, "shown": len(part),
            "truncated": len(part) < size, "hex": part[:64].hex(" ") if binary else ""}


def shown_copy(copy) -> dict:
    """A peeked message (messaging.amqp.peeking.Peeked) as a page shows it: body, headers and properties."""
    return {"copy": copy, "body": body_part(copy.body, size=copy.size), "headers": pretty_json(copy.headers),
            "properties": pretty_json(copy.properties)}
