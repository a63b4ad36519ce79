"""Messages' and queues' URLs: the id or name as one path segment that browsers and the resolver read back exactly."""
from __future__ import annotations

import re
from urllib.parse import quote, unquote

from django.urls import register_converter, reverse

# What a message_id of "." or ".." is written as in a path, and ids that look like that written form
# (they get one more "%25" so that no two ids share a URL): a browser resolves "." and ".." segments,
# "%2E" and "%2E%2E" among them, before it sends the request.
DOTS = {".": "%2E", "..": "%2E%2E"}
LOOKS_ESCAPED = re.compile(r"%(?:25)*2E(?:%2E)?")
PLACEHOLDER = "-"


def path_segment(message_id: str) -> str:
    """`message_id` as one percent-encoded path segment: "/" is "%2F", and no segment is "." or ".."."""
    if message_id in DOTS:
        message_id = DOTS[message_id]
    elif LOOKS_ESCAPED.fullmatch(message_id):
        message_id = "%25" + message_id[1:]
    return quote(message_id, safe="")


def message_id_from_path(value: str) -> str:
    """The message_id of a path segment once the server has decoded it (the inverse of `path_segment`)."""
    for message_id, written in DOTS.items():
        if value == written:
            return message_id
    if LOOKS_ESCAPED.fullmatch(value):
        return "%" + value[3:]
    return value


def message_url(name: str, message_id: str) -> str:
    """The path of URL `name` (a route ending in <message_id:message_id>/) for `message_id`."""
    # Not reverse(name, args=[message_id]): reverse leaves "/" and "." as they are, and a browser
    # reads "a/../b" as a path to walk.
    url = reverse(name, kwargs={"message_id": PLACEHOLDER})
    return url[:-len(PLACEHOLDER) - 1] + path_segment(message_id) + "/"


def queue_segment(name: str) -> str:
    """A queue's name as a page's path segment (before `reverse` quotes it once more): percent-encoded, with
    "." and ".." written %2E, so that once the server has decoded the path the segment has no "/" and is no dot."""
    return DOTS.get(name) or quote(name, safe="")


def queue_from_segment(value: str) -> str:
    """The queue's name of a decoded path segment (the inverse of `queue_segment`)."""
    return unquote(value)


class QueueConverter:
    """`<queue:name>`: a queue's name in a page's path, any characters but NUL, written by `queue_segment`:
    percent-encoded twice, so that the decoded path still holds it as one segment ("/" and "." too) and a
    route's suffix (`.../replay/`) is never part of a name."""

    regex = r"[^/\x00]+"

    def to_python(self, value: str) -> str:
        return queue_from_segment(value)

    def to_url(self, value: str) -> str:
        return queue_segment(value)


# Here rather than in urls.py: the admin's URLs (built first, config/urls.py lists admin/ first) use it too.
register_converter(QueueConverter, "queue")
