"""Template context shared by every page."""
from __future__ import annotations

import hashlib
from datetime import timedelta

from django.core.cache import cache
from django.db import DatabaseError
from django.utils import timezone

from messaging import conf
from messaging.amqp import management
from messaging.models import Message

BLOCKED_REASON_PREFIX = "broker blocked"
# Every page shows the alarms: the management API is asked at most this often (per cache).
ALARMS_CACHE_SECONDS = 5.0


def broker_alarms() -> list[str] | None:
    """The broker's resource alarms from the management API (cached a few seconds); None when unknown."""
    if not management.configured():
        return None
    # Keyed by a hash of the API's URL: the alarms are one broker's, and the key holds no password.
    key = "mailroom:alarms:" + hashlib.sha256(conf.get("RABBITMQ_MANAGEMENT_URL").encode()).hexdigest()
    cached = cache.get(key)  # a 1-tuple, since None (unknown) is an answer worth keeping too
    if cached is not None:
        return cached[0]
    alarms = management.alarms()
    cache.set(key, (alarms,), timeout=ALARMS_CACHE_SECONDS)
    return alarms


def broker_status(request) -> dict:
    """`broker_blocked`: the broker has a memory or disk alarm, or a recent message is pending because of one.

    The management API tells about the alarm itself (RABBITMQ_MANAGEMENT_URL); without it, a message
    held back by a blocked broker in the last hour that is still pending tells about it.
    """
    alarms = broker_alarms()
    if alarms:
        return {"broker_blocked": True, "broker_alarms": alarms}
    if alarms is not None:  # the broker says there is no alarm: pending messages will be relayed
        return {"broker_blocked": False, "broker_alarms": []}
    try:
        blocked = Message.objects.pending().filter(
            last_error__startswith=BLOCKED_REASON_PREFIX, created_at__gte=timezone.now() - timedelta(hours=1),
        ).exists()
    except DatabaseError:
        blocked = False
    return {"broker_blocked": blocked, "broker_alarms": []}
