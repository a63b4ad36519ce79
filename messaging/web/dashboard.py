"""The dashboard's figures, each one a bounded query whatever the size of the history."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count
from django.db.models.functions import TruncMinute
from django.utils import timezone

from messaging.audit import reconciling
from messaging.models import Delivery, Message, Worker
from messaging.web.counting import COUNT_CAP, RowCount, capped_count

logger = logging.getLogger(__name__)

CHART_MINUTES = 60
UNDELIVERED_AFTER_MINUTES = 5
# The dashboard looks for undelivered messages in the hour before the cutoff (the traffic's size,
# not the history's); `manage.py reconcile` looks further back.
UNDELIVERED_LOOKBACK = timedelta(hours=1)


def message_counts() -> list[tuple[str, str, RowCount]]:
    """(status, label, count) for each message status; each count rides the (status, created_at) index."""
    return [(value, label, capped_count(Message.objects.filter(status=value))) for value, label in Message.Status.choices]


def delivery_counts() -> list[tuple[str, str, RowCount]]:
    """(status, label, count) for each delivery status; the rare ones ride the small unacked index."""
    return [(value, label, capped_count(Delivery.objects.filter(status=value))) for value, label in Delivery.Status.choices]


@dataclass(frozen=True, kw_only=True)
class Chart:
    """Messages published vs deliveries received per minute, as SVG coordinates."""

    width: int
    height: int
    published: str  # polyline points
    consumed: str
    peak: int
    published_total: int
    consumed_total: int
    ticks: list[tuple[float, str]]  # (x, label)
    start: datetime
    end: datetime


def per_minute(queryset, field: str, *, since: datetime) -> dict[datetime, int]:
    rows = (queryset.filter(**{f"{field}__gte": since}).order_by().annotate(minute=TruncMinute(field))
            .values("minute").annotate(n=Count("id")).values_list("minute", "n"))
    return {minute: n for minute, n in rows}


def traffic_chart(*, minutes: int = CHART_MINUTES, width: int = 720, height: int = 180) -> Chart:
    """The last `minutes` of traffic; two GROUP BY queries over indexed time ranges."""
    end = timezone.now().replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    published = per_minute(Message.objects.exclude(published_at=None), "published_at", since=start)
    consumed = per_minute(Delivery.objects.all(), "received_at", since=start)
    slots = [start + timedelta(minutes=i) for i in range(minutes)]
    series_p = [published.get(s, 0) for s in slots]
    series_c = [consumed.get(s, 0) for s in slots]
    peak = max([1, *series_p, *series_c])
    left, bottom, top = 40, height - 20, 10

    def points(series: list[int]) -> str:
        step = (width - left - 10) / max(1, minutes - 1)
        return " ".join(
            f"{left + i * step:.1f},{bottom - (n / peak) * (bottom - top):.1f}" for i, n in enumerate(series)
        )

    step = (width - left - 10) / max(1, minutes - 1)
    ticks = [(left + i * step, timezone.localtime(s).strftime("%H:%M")) for i, s in enumerate(slots) if i % 10 == 0]
    return Chart(width=width, height=height, published=points(series_p), consumed=points(series_c), peak=peak,
                 published_total=sum(series_p), consumed_total=sum(series_c), ticks=ticks, start=start, end=end)


def workers_alive():
    return list(Worker.objects.filter(
        status=Worker.Status.RUNNING, heartbeat_at__gte=timezone.now() - timedelta(seconds=60),
    ).order_by("host", "pid")[:50])


def recent_failures(*, limit: int = 10) -> list[dict]:
    """The latest failed/unroutable messages and rejected deliveries, newest first (one index range each)."""
    failures = []
    for status in (Message.Status.FAILED, Message.Status.UNROUTABLE):
        for m in Message.objects.filter(status=status).only(
                "message_id", "status", "last_error", "created_at", "exchange", "routing_key")[:limit]:
            failures.append({"message_id": m.message_id, "what": f"letter {m.status}", "reason": m.last_error,
                             "at": m.created_at, "where": m.destination})
    for d in Delivery.objects.filter(status=Delivery.Status.REJECTED).select_related("message").only(
            "queue", "error", "received_at", "message__message_id").order_by("-received_at", "-id")[:limit]:
        failures.append({"message_id": d.message.message_id, "what": "delivery rejected",
                         "reason": d.error.strip().splitlines()[-1] if d.error.strip() else "",
                         "at": d.received_at, "where": f"queue {d.queue!r}"})
    return sorted(failures, key=lambda f: f["at"], reverse=True)[:limit]


def summary() -> dict:
    """Everything the dashboard shows from the database."""
    messages, deliveries = message_counts(), delivery_counts()
    return {
        "message_counts": messages,
        "delivery_counts": deliveries,
        # The "≈" note only where a count is an estimate (PostgreSQL past the cap; SQLite always counts).
        "counts_estimated": any(n.estimated for _, _, n in messages + deliveries),
        "count_cap": f"{COUNT_CAP:,}",
        "chart": traffic_chart(),
        "workers": workers_alive(),
        "failures": recent_failures(),
        "undelivered": list(reconciling.undelivered(
            minutes=UNDELIVERED_AFTER_MINUTES, lookback=UNDELIVERED_LOOKBACK, limit=20)),
        "undelivered_after": UNDELIVERED_AFTER_MINUTES,
    }
