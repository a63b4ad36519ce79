"""Counts and filters that stay cheap however long the history: exact up to a cap, the planner's estimate beyond."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet

logger = logging.getLogger(__name__)

# Up to this many rows a count is exact: counting that many through an index is cheap.
COUNT_CAP = 10_000


@dataclass(frozen=True, kw_only=True)
class RowCount:
    """A row count; `estimated` when it went past the cap and comes from the query planner."""

    value: int
    estimated: bool = False

    def __str__(self) -> str:
        return f"≈{self.value:,}" if self.estimated else f"{self.value:,}"


def planner_estimate(queryset: QuerySet) -> int | None:
    """PostgreSQL's estimate of the rows `queryset` returns (EXPLAIN, nothing read); None elsewhere."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    sql, params = queryset.order_by().values("pk").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def capped_count(queryset: QuerySet, *, cap: int = COUNT_CAP) -> RowCount:
    """Count exactly up to `cap` rows (one bounded query); past it, estimate (PostgreSQL) or count."""
    n = queryset.order_by().values("pk")[: cap + 1].count()
    if n <= cap:
        return RowCount(value=n)
    estimate = planner_estimate(queryset)
    if estimate is None:
        return RowCount(value=queryset.count())
    return RowCount(value=max(estimate, n), estimated=True)


# Lists count fewer: behind a filter each row counted may cost an index probe (EXISTS), and a
# count that stops after PAGE_COUNT_CAP matches costs the same however large the table.
PAGE_COUNT_CAP = 1_000


class CappedCountPaginator(Paginator):
    """A paginator whose count is exact up to PAGE_COUNT_CAP rows and estimated beyond (no COUNT(*) of the table)."""

    @cached_property
    def count(self) -> int:
        if not isinstance(self.object_list, QuerySet):
            return super().count
        return capped_count(self.object_list, cap=PAGE_COUNT_CAP).value


# Filters on a message's deliveries look at this many of the latest matching deliveries: an index
# range of fixed size, where "any delivery ever on queue X" would be a semi-join over the whole
# history. Older messages are found by message_id or in the Deliveries list (complete, by date).
RECENT_DELIVERIES = 1_000


def recently_delivered(*, queue: str | None = None, status: str | None = None,
                       limit: int = RECENT_DELIVERIES) -> QuerySet:
    """Ids of the messages of the latest `limit` deliveries on `queue` and/or with `status`."""
    from messaging.models import Delivery

    deliveries = Delivery.objects.all()
    if queue is not None:
        deliveries = deliveries.filter(queue=queue)
    if status is not None:
        deliveries = deliveries.filter(status=status)
    return deliveries.order_by("-received_at").values("message_id")[:limit]
