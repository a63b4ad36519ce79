"""The dead-letter pages: the dead-letter queues (`/dead-letters/`) and what is in one, grouped by original
queue and reason, each message with its trail (`/dead-letters/<queue>/`)."""
from __future__ import annotations

from django import forms
from django.contrib.auth.decorators import login_required, permission_required
from django.shortcuts import render

from messaging.amqp import peeking
from messaging.amqp.deaths import REASONS
from messaging.errors import ManagementRefused, ManagementUnavailable
from messaging.models import Delivery
from messaging.web import deadletters
from messaging.web.display import shown_copy
from messaging.web.replay import replay_url

REASON_CHOICES = [("", "any reason"), *((r, Delivery.DeathReason(r).label) for r in REASONS),
                  (deadletters.NO_DEATH, "no x-death")]


class DeadLetterFilterForm(forms.Form):
    """The dead-letter page's filters (query parameters)."""

    original = forms.CharField(required=False, max_length=255, strip=False, label="Original queue",
                               help_text=f"Exact name; {deadletters.NO_DEATH} for messages without x-death.")
    reason = forms.ChoiceField(required=False, choices=REASON_CHOICES)
    count = forms.IntegerField(required=False, min_value=1, max_value=peeking.MAX_PEEK,
                               label="Messages to read",
                               help_text=f"From the head of the queue, at most {peeking.MAX_PEEK}.")


@login_required
@permission_required("messaging.view_message", raise_exception=True)
def dead_letters(request):
    try:
        queues, error = deadletters.dead_letter_queues(), ""
    except ManagementUnavailable as exc:
        queues, error = None, f"{exc} Dead-letter queues are found through it."
    return render(request, "messaging/dead_letters.html", {"queues": queues, "error": error})


@login_required
@permission_required("messaging.view_message", raise_exception=True)
def dead_letter_queue(request, queue: str):
    form = DeadLetterFilterForm(request.GET)
    context = {"queue": queue, "form": form, "notice": peeking.NOTICE, "replay_url": replay_url(queue),
               "found": None, "error": "", "groups": []}
    if not form.is_valid():
        return render(request, "messaging/dead_letter_queue.html", context, status=400)
    d = form.cleaned_data
    try:
        found = deadletters.contents(queue, count=d["count"] or deadletters.DEFAULT_COUNT,
                                     original=d["original"] or None, reason=d["reason"] or None)
    except ManagementUnavailable as exc:
        context["error"] = f"{exc} The dead-letter queue is read through it."
        return render(request, "messaging/dead_letter_queue.html", context, status=503)
    except ManagementRefused as exc:
        context["error"] = str(exc)
        return render(request, "messaging/dead_letter_queue.html", context, status=409)
    if found is None:
        context["error"] = "There is no queue with this name."
        return render(request, "messaging/dead_letter_queue.html", context, status=404)
    context["found"] = found
    context["groups"] = [
        {"group": g, "letters": [{**shown_copy(letter.copy), "letter": letter} for letter in g.letters]}
        for g in found.groups
    ]
    return render(request, "messaging/dead_letter_queue.html", context)
