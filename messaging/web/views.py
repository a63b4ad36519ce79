"""Pages: publish, the history, a message's trail, the dashboard."""
from __future__ import annotations

import hashlib

from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required, permission_required
from django.db import transaction
from django.db.models import BinaryField, OuterRef, Q, Subquery
from django.db.models.functions import Substr
from django.shortcuts import get_object_or_404, redirect, render

from messaging.errors import InvalidMessage
from messaging.models import Delivery, Message
from messaging.outbox import publishing
from messaging.outbox.publishing import create_message
from messaging.outbox.requests import publish_request
from messaging.outbox.routing import preview_route
from messaging.search import search
from messaging.web import dashboard as dashboard_figures
from messaging.web import queues
from messaging.web.counting import (
    RECENT_DELIVERIES,
    CappedCountPaginator,
    recently_delivered,
)
from messaging.web.display import PREVIEW_BYTES, body_preview, pretty_json
from messaging.web.forms import PublishForm
from messaging.web.links import message_url
from messaging.web.uploads import letter_form

PAGE_SIZE = 50


@transaction.non_atomic_requests  # a request waiting for its reply commits before it waits
@letter_form
@login_required
@permission_required("messaging.add_message", raise_exception=True)
def publish(request):
    form = PublishForm(request.POST or None)
    preview = None
    if request.method == "POST" and form.is_valid():
        if "preview" in request.POST:  # re-render with where the message would go; nothing is written
            d = form.cleaned_data
            preview = preview_route(exchange=d["exchange"], routing_key=d["routing_key"], headers=d["headers"],
                                    declare=d["declare"])
        else:
            wait = form.cleaned_data.get("wait_reply")
            try:
                if wait:  # the request is committed, then published; no transaction is held while it waits
                    outcome = publish_request(wait=wait, **form.message_kwargs(), origin=Message.Origin.FORM,
                                              user=request.user)
                    return _after_publish(request, outcome.request, note=outcome.note, replied=outcome.reply is not None)
                with transaction.atomic():
                    message = create_message(**form.message_kwargs(), origin=Message.Origin.FORM, user=request.user)
            except InvalidMessage as exc:  # e.g. a message_id already used
                form.add_error(None, str(exc))
            else:
                return _after_publish(request, message)
    return render(request, "messaging/publish.html", {"form": form, "preview": preview})


def _after_publish(request, message: Message, *, note: str = "", replied: bool = False):
    """Tell the user the outcome recorded after the commit (and a request's reply, in `note`), then show the message."""
    if note and message.status == Message.Status.PUBLISHED:
        (flash.success if replied else flash.warning)(request, f"Published. {note}")
    elif message.status == Message.Status.PENDING:
        flash.warning(request, f"Not published yet: {message.last_error or 'waiting for the broker'}. "
                               "It is kept as pending and the relay will retry.")
    elif message.status != Message.Status.PUBLISHED:
        flash.error(request, f"{message.get_status_display()}: {message.last_error}")
    else:
        flash.success(request, "Published.")
    return redirect(message_url("message-detail", message.message_id))


@login_required
@permission_required(["messaging.add_message", "messaging.view_message"], raise_exception=True)
def republish(request, message_id: str):
    """Confirm, then publish a copy of a message that records its original and who republished it."""
    original = get_object_or_404(Message, message_id=message_id)
    if request.method == "POST":
        try:
            with transaction.atomic():
                copy = publishing.republish(original, user=request.user)
        except InvalidMessage as exc:
            flash.error(request, f"Cannot republish: {exc}")
            return redirect(message_url("message-detail", original.message_id))
        return _after_publish(request, copy)
    return render(request, "messaging/republish_confirm.html", {
        "message": original, "notes": publishing.republish_notes(original),
    })


@login_required
@permission_required("messaging.view_message", raise_exception=True)
def message_list(request):
    messages = Message.objects.only(
        "message_id", "exchange", "routing_key", "status", "origin", "created_at", "body_size", "content_type",
    )
    status = request.GET.get("status", "")
    queue = request.GET.get("queue", "").strip()
    q = request.GET.get("q", "")
    if status in Message.Status.values:
        messages = messages.filter(status=status)
    if queue:
        # Not a join + DISTINCT over every delivery ever made on the queue: the messages of its
        # latest deliveries and the latest sent to it directly (two fixed-size index ranges).
        ids = set(messages.filter(exchange="", routing_key=queue).order_by("-created_at")
                  .values_list("pk", flat=True)[:RECENT_DELIVERIES])
        ids.update(row["message_id"] for row in recently_delivered(queue=queue))
        messages = messages.filter(pk__in=ids)
    messages = search(messages, q)
    page = CappedCountPaginator(messages.order_by("-created_at", "-id"), PAGE_SIZE).get_page(request.GET.get("page"))
    rows = page_rows(list(page.object_list))
    return render(request, "messaging/message_list.html", {
        "page": page, "rows": rows, "status": status, "queue": queue, "q": q, "statuses": Message.Status.choices,
    })


def page_rows(messages: list[Message]) -> list[dict]:
    """Each message of a page with its latest delivery's status and a body preview: one query for the page's ids.

    The database cuts each body to its first PREVIEW_BYTES (a large body is never read whole) and
    finds each message's latest delivery (on any queue) through the index led by the message: one
    short lookup per row of the page, never a join over the history.
    """
    if not messages:
        return []
    latest = Delivery.objects.filter(message=OuterRef("pk")).order_by("-received_at", "-id").values("status")[:1]
    extra = {pk: (state, prefix) for pk, state, prefix in Message.objects.filter(pk__in=[m.pk for m in messages])
             .order_by().annotate(state=Subquery(latest),
                                  prefix=Substr("body", 1, PREVIEW_BYTES, output_field=BinaryField()))
             .values_list("pk", "state", "prefix")}
    rows = []
    for m in messages:
        state, prefix = extra.get(m.pk, (None, b""))
        rows.append({"message": m, "delivery": state or "",
                     "preview": body_preview(bytes(prefix or b""), size=m.body_size)})
    return rows


@login_required
@permission_required("messaging.view_message", raise_exception=True)
def message_detail(request, message_id: str):
    message = get_object_or_404(
        Message.objects.select_related("published_by", "republished_from")
        .defer("republished_from__body", "republished_from__headers", "republished_from__properties"),
        message_id=message_id,
    )
    # The latest deliveries only: another producer may send one message_id again and again, and the
    # page reloads itself every second while a delivery is unsettled.
    # A delivered body is kept only when it differs from the letter's: its first bytes, never all of it.
    latest = list(message.deliveries.select_related("worker").defer("body").annotate(
        body_prefix=Substr("body", 1, PREVIEW_BYTES, output_field=BinaryField()),
    ).newest_first()[:DELIVERIES_SHOWN + 1])
    for d in latest:
        d.body_shown = body_preview(bytes(d.body_prefix), size=d.body_size) if d.body_prefix is not None else ""
    earlier = 0
    if len(latest) > DELIVERIES_SHOWN:  # those before the oldest shown (not a count of all: more may come meanwhile)
        oldest = latest[DELIVERIES_SHOWN - 1]
        earlier = message.deliveries.filter(
            Q(received_at__lt=oldest.received_at) | Q(received_at=oldest.received_at, pk__lt=oldest.pk)).count()
    return render(request, "messaging/message_detail.html", {
        "message": message, "deliveries": latest[:DELIVERIES_SHOWN][::-1], "earlier_deliveries": earlier,
        "in_reply_to": Message.objects.only("message_id").filter(pk=message.in_reply_to_id).first()
        if message.in_reply_to_id else None,
        "replies": reply_rows(message),
        "body": body_view(bytes(message.body), sha256=message.body_sha256),
        "headers": pretty_json(message.headers), "properties": pretty_json(message.properties),
    })


DELIVERIES_SHOWN = 100


REPLIES_SHOWN = 10  # a request's replies, oldest first (a server may answer one request more than once)
REPLY_BODY_BYTES = 4096


def reply_rows(message: Message) -> list[dict]:
    """The first `REPLIES_SHOWN` replies to `message`, each with the first REPLY_BODY_BYTES of its body."""
    if not (message.properties or {}).get("reply_to") or message.origin == Message.Origin.EXTERNAL:
        return []  # only a letter Mailroom published with reply_to is answered (`messaging.consumer.linking`)
    replies = (message.replies.only("message_id", "created_at", "content_type", "body_size", "body_sha256")
               .annotate(body_prefix=Substr("body", 1, REPLY_BODY_BYTES, output_field=BinaryField()))
               .order_by("created_at", "pk")[:REPLIES_SHOWN])
    return [{"message": r, "body": body_view(bytes(r.body_prefix or b""), sha256=r.body_sha256, size=r.body_size)}
            for r in replies]


PAGE_BODY_BYTES = 64 * 1024  # the page reloads itself every second until the message settles


def body_view(body: bytes, *, sha256: str = "", size: int | None = None) -> dict:
    """How to show a body: its first `PAGE_BODY_BYTES` as text (escaped by the template), or a hex
    preview when it is binary; its size and sha256 either way. `size`: the whole body's, when `body`
    is only its first bytes."""
    size = len(body) if size is None else size
    shown = body[:PAGE_BODY_BYTES]
    try:
        text = shown.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A character cut at the end of the part shown is still text; anything else is binary.
        cut = len(shown) < size and exc.reason == "unexpected end of data" and exc.start >= len(shown) - 3
        shown, text = (shown[:exc.start], shown[:exc.start].decode("utf-8")) if cut else (b"", None)
    binary = text is None or "\x00" in text
    return {
        "binary": binary, "text": "" if binary else text, "size": size, "shown": len(shown),
        "truncated": not binary and len(shown) < size,
        "sha256": sha256 or hashlib.sha256(body).hexdigest(), "hex": body[:64].hex(" ") if binary else "",
    }


@login_required
@permission_required("messaging.view_message", raise_exception=True)
def dashboard(request):
    broker = queues.broker_view(limit=10)
    return render(request, "messaging/dashboard.html", {
        **dashboard_figures.summary(), "deepest": broker.deepest(5), "broker": broker,
    })
