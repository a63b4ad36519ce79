"""What the message list adds to each row, and the CSV and JSON exports, read in chunks and streamed."""
from __future__ import annotations

import base64
import csv
import json
from datetime import datetime

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Count, IntegerField, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import StreamingHttpResponse
from django.utils import timezone

from messaging.models import Delivery

# Rows read per query while streaming an export: memory stays flat however many are selected.
EXPORT_CHUNK = 2000

EXPORT_FIELDS = [
    "message_id", "status", "origin", "exchange", "routing_key", "correlation_id", "content_type",
    "content_encoding", "delivery_mode", "headers", "properties", "body_size", "body_sha256", "body",
    "body_encoding", "published_by", "republished_from", "last_error", "created_at", "published_at",
    "delivery_count", "last_delivery_status", "last_delivered_at",
]
DELIVERY_EXPORT_FIELDS = [
    "queue", "attempt", "redelivered", "duplicate", "status", "exchange", "routing_key", "consumer_tag",
    "received_at", "handled_at", "settled_at", "error",
]


def with_delivery_summary(queryset):
    """Annotate each message with its number of deliveries and its last one (status, time)."""
    deliveries = Delivery.objects.filter(message=OuterRef("pk"))
    last = deliveries.order_by("-received_at", "-id")
    return queryset.annotate(
        delivery_count=Coalesce(
            Subquery(deliveries.order_by().values("message").annotate(n=Count("id")).values("n")[:1]),
            Value(0), output_field=IntegerField(),
        ),
        last_delivery_status=Subquery(last.values("status")[:1]),
        last_delivered_at=Subquery(last.values("received_at")[:1]),
    )


def body_text(body: bytes) -> tuple[str, str]:
    """(text, encoding) for an export: UTF-8 text when it is, base64 otherwise."""
    try:
        text = body.decode("utf-8")
        if "\x00" not in text:
            return text, "utf-8"
    except UnicodeDecodeError:
        pass
    return base64.b64encode(body).decode("ascii"), "base64"


def csv_safe(value) -> str:
    """A cell a spreadsheet will not run as a formula (=, +, -, @ and control characters lead)."""
    text = "" if value is None else value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def export_rows(queryset, *, deliveries: bool = False):
    """Each selected message as a dict, read in chunks so memory stays flat (deliveries: one query a chunk)."""
    # defer(None): the list's queryset defers body, headers...; read per message they would be a query each.
    messages = with_delivery_summary(queryset.defer(None).select_related("published_by", "republished_from"))
    messages = messages.order_by("-created_at", "-id")
    if deliveries:
        messages = messages.prefetch_related(
            models.Prefetch("deliveries", queryset=Delivery.objects.order_by("received_at", "id")))
    for message in messages.iterator(chunk_size=EXPORT_CHUNK):
        body, encoding = body_text(bytes(message.body))
        row = {f: getattr(message, f, None) for f in EXPORT_FIELDS}
        row.update(
            body=body, body_encoding=encoding,
            published_by=message.published_by.get_username() if message.published_by else "",
            republished_from=message.republished_from.message_id if message.republished_from else "",
        )
        yield message, row


class Echo:
    """A file for `csv.writer` that hands each line back instead of keeping it, for streaming."""

    def write(self, value):
        return value


def csv_response(queryset) -> StreamingHttpResponse:
    """The selected messages as a CSV download, one row each."""
    writer = csv.writer(Echo())

    def lines():
        yield writer.writerow(EXPORT_FIELDS)
        for _, row in export_rows(queryset):
            yield writer.writerow([csv_safe(json.dumps(row[f], cls=DjangoJSONEncoder) if f in ("headers", "properties")
                                            else row[f]) for f in EXPORT_FIELDS])
    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="letters-{timezone.now():%Y%m%dT%H%M%S}.csv"'
    return response


def json_response(queryset) -> StreamingHttpResponse:
    """The selected messages as a JSON download, each with its deliveries."""
    encoder = DjangoJSONEncoder()

    def chunks():
        yield "["
        first = True
        for message, row in export_rows(queryset, deliveries=True):
            row["deliveries"] = [{f: getattr(d, f) for f in DELIVERY_EXPORT_FIELDS} for d in message.deliveries.all()]
            yield ("" if first else ",") + "\n" + encoder.encode(row)
            first = False
        yield "\n]\n"
    response = StreamingHttpResponse(chunks(), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="letters-{timezone.now():%Y%m%dT%H%M%S}.json"'
    return response
