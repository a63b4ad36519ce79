"""The replay page: a dead-letter queue's messages, where each would go, and a button that replays them.

GET shows the dry run (the copies are taken and put back: they come back marked redelivered); POST
replays up to `PAGE_LIMIT` copies, so that a request never runs long, and reports back. Both need
the publisher role (`add_message` and `view_message`), as republishing does.
"""
from __future__ import annotations

from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required, permission_required
from django.db import DatabaseError
from django.shortcuts import redirect, render
from django.urls import reverse

from messaging.errors import MailroomError, NoSuchQueue
from messaging.outbox.replay import replay

PAGE_LIMIT = 100  # copies one click replays (and the confirmation lists) at most


def replay_url(queue: str) -> str:
    """The replay page of `queue`, any name (`<queue:...>` writes it as one path segment)."""
    return reverse("dead-letter-replay", kwargs={"queue": queue})


@login_required
@permission_required(["messaging.add_message", "messaging.view_message"], raise_exception=True)
def replay_dead_letters(request, queue: str):
    """Confirm (the dry run), then replay up to PAGE_LIMIT copies from dead-letter queue `queue`."""
    dry_run = request.method != "POST"
    try:
        report = replay(queue=queue, limit=PAGE_LIMIT, dry_run=dry_run, user=request.user)
    except NoSuchQueue as exc:
        return render(request, "messaging/replay_confirm.html", {"queue": queue, "error": f"{exc}."}, status=404)
    except (MailroomError, DatabaseError) as exc:
        error = f"Cannot read the queue now: {exc.__class__.__name__}. Try again in a moment."
        if not isinstance(exc, DatabaseError):
            error = f"Cannot read the queue now: {exc}. Try again in a moment."
        return render(request, "messaging/replay_confirm.html", {"queue": queue, "error": error}, status=503)
    if dry_run:
        return render(request, "messaging/replay_confirm.html", {
            "queue": queue, "report": report, "limit": PAGE_LIMIT, "more": len(report.steps) >= PAGE_LIMIT,
        })
    level = flash.warning if report.left or report.stopped else flash.success
    level(request, report.summary() + ".")
    for step in report.steps:
        if step.reason and step.outcome not in ("replayed", "already replayed"):
            flash.warning(request, step.line())
    return redirect(replay_url(queue))
