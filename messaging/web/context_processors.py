"""Template context shared by every page."""
from __future__ import annotations

from datetime import timedelta

from django.db import DatabaseError
from django.utils import timezone

from messaging.models import Message
from messaging.web import cluster

BLOCKED_REASON_PREFIX = "broker blocked"


def broker_status(request) -> dict:
    """`broker_blocked`: the broker has a memory or disk alarm, or a recent message is pending because of one;
    `broker_alarms` and `cluster_troubles` (nodes down or partitioned) name the nodes, for users logged in.

    The management API tells about the alarm itself (RABBITMQ_MANAGEMENT_URL); without it, a message
    held back by a blocked broker in the last hour that is still pending tells about it.
    """
    rows = cluster.nodes()
    if rows is not None:  # the broker says whether there is an alarm: without one, pending messages will be relayed
        named = getattr(getattr(request, "user", None), "is_authenticated", False)
        alarms = cluster.alarms(rows)
        return {"broker_blocked": bool(alarms), "broker_alarms": alarms if named else [],
                "cluster_troubles": cluster.troubles(rows) if named else []}
    try:
        blocked = Message.objects.pending().filter(
            last_error__startswith=BLOCKED_REASON_PREFIX, created_at__gte=timezone.now() - timedelta(hours=1),
        ).exists()
    except DatabaseError:
        blocked = False
    return {"broker_blocked": blocked, "broker_alarms": [], "cluster_troubles": []}
