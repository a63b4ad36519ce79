"""Template context shared by every page."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

from django.db import DatabaseError
from django.utils import timezone

from messaging.amqp import management
from messaging.models import Message

BLOCKED_REASON_PREFIX = "broker blocked"
ALARMS_CACHE_SECONDS = 5.0

_alarms_lock = threading.Lock()
_alarms_cache: tuple[float, list[str] | None] = (0.0, None)


def broker_alarms() -> list[str] | None:
    """The broker's resource alarms from the management API (cached a few seconds); None when unknown."""
    global _alarms_cache
    if not management.configured():
        return None
    with _alarms_lock:
        checked_at, alarms = _alarms_cache
        if time.monotonic() - checked_at < ALARMS_CACHE_SECONDS:
            return alarms
    alarms = management.alarms()
    with _alarms_lock:
        _alarms_cache = (time.monotonic(), alarms)
    return alarms


def broker_status(request) -> dict:
    """`broker_blocked`: the broker has a memory or disk alarm, or a recent letter is pending because of one.

    The management API tells about the alarm itself (RABBITMQ_MANAGEMENT_URL); without it, a letter
    held back by a blocked broker in the last hour that is still pending tells about it.
    """
    alarms = broker_alarms()
    if alarms:
        return {"broker_blocked": True, "broker_alarms": alarms}
    if alarms is not None:  # the broker says there is no alarm: pending letters will be relayed
        return {"broker_blocked": False, "broker_alarms": []}
    try:
        blocked = Message.objects.pending().filter(
            last_error__startswith=BLOCKED_REASON_PREFIX, created_at__gte=timezone.now() - timedelta(hours=1),
        ).exists()
    except DatabaseError:
        blocked = False
    return {"broker_blocked": blocked, "broker_alarms": []}
