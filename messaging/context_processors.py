"""Template context shared by every page."""
from __future__ import annotations

from datetime import timedelta

from django.db import DatabaseError
from django.utils import timezone

from messaging.models import Message

BLOCKED_REASON_PREFIX = "broker blocked"


def broker_status(request) -> dict:
    """`broker_blocked`: a letter was held back by a blocked broker in the last few minutes and is still pending."""
    try:
        blocked = Message.objects.pending().filter(
            last_error__startswith=BLOCKED_REASON_PREFIX, created_at__gte=timezone.now() - timedelta(hours=1),
        ).exists()
    except DatabaseError:
        blocked = False
    return {"broker_blocked": blocked}
