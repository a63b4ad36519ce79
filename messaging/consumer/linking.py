"""Linking replies to their requests as the consumer records them (`Message.in_reply_to`).

A reply is a new letter whose correlation_id is that of a request Mailroom published with a
reply_to (RabbitMQ tutorial 6). Most letters have no correlation_id and cost nothing here; the rest
of a batch cost one indexed look-up on the driver's own cursor (the writer's) and, when some are
replies, one UPDATE.
"""
from __future__ import annotations

import json

from messaging.consumer.writers import MESSAGE_COLUMNS, Writer
from messaging.models import Message

MESSAGE_ID, CORRELATION_ID = MESSAGE_COLUMNS.index("message_id"), MESSAGE_COLUMNS.index("correlation_id")


def link_replies(rows: list[tuple], inserted: dict[str, int], *, writer: Writer) -> int:
    """Set in_reply_to on the `Message` rows just inserted (MESSAGE_COLUMNS; `inserted`: {message_id: pk})
    that answer a request: the latest letter Mailroom published with that correlation_id and a reply_to.
    Returns how many were linked. Runs inside the batch's transaction."""
    answers = {inserted[row[MESSAGE_ID]]: row[CORRELATION_ID] for row in rows
               if row[CORRELATION_ID] and row[MESSAGE_ID] in inserted}
    if not answers:
        return 0
    latest: dict[str, tuple] = {}  # correlation_id -> (created_at, pk) of its latest request
    for correlation_id, pk, created_at, properties in writer.requests(list(set(answers.values()))):
        if isinstance(properties, str):  # SQLite gives the JSON's text
            properties = json.loads(properties)
        if isinstance(properties, dict) and properties.get("reply_to"):
            latest[correlation_id] = max(latest.get(correlation_id, (created_at, pk)), (created_at, pk))
    replies = [Message(pk=pk, in_reply_to_id=latest[correlation_id][1])
               for pk, correlation_id in answers.items() if correlation_id in latest]
    if replies:
        Message.objects.bulk_update(replies, ["in_reply_to"])
    return len(replies)
