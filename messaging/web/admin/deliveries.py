"""The Delivery admin: every delivery of every message, by date, searched by queue or message_id."""
from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from messaging.amqp import peeking
from messaging.errors import ManagementRefused, ManagementUnavailable
from messaging.models import Delivery, Message
from messaging.web import deadletters, links  # noqa: F401 — links registers <queue:…>
from messaging.web.admin.base import ReadOnlyAdmin, calendar, timestamp
from messaging.web.admin.exports import body_text
from messaging.web.admin.filters import (
    AnomalyFilter,
    DeadLetteredFromFilter,
    DeathReasonFilter,
    DeliveryQueueFilter,
)


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    # Status second: it stays on a 1280 px screen beside the filters; long names are cut by admin.css.
    list_display = ["received", "status", "message_link", "queue", "attempt", "redelivered", "worker", "settled"]
    list_filter = ["status", DeliveryQueueFilter, "redelivered", AnomalyFilter, DeathReasonFilter,
                   DeadLetteredFromFilter]
    search_fields = ["queue"]  # exact message_id or queue: see get_search_results
    search_help_text = "Exact message_id of the letter, or queue name."
    date_hierarchy = "received_at"
    list_select_related = ["message", "worker"]
    sortable_by = ["received"]
    ordering = ["-received_at", "-id"]
    readonly_fields = ["message_link", "queue", "consumer_tag", "delivery_tag", "redelivered", "attempt", "duplicate",
                       "exchange", "routing_key", "status", "worker", "received", "handled", "settled", "error",
                       "anomaly", "body_size", "body_sha256", "delivered_body", "retry_delay", "dead_lettered_from",
                       "death_reason", "death_exchange", "death_routing_keys", "death_count", "died"]
    fieldsets = [
        (None, {"fields": readonly_fields[:-7]}),
        ("Retry and dead-lettering (x-death)", {"fields": readonly_fields[-7:]}),
    ]

    received = timestamp("received_at", sortable=True)
    handled = timestamp("handled_at")
    settled = timestamp("settled_at")
    died = timestamp("died_at", description="died at (x-death)")

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.resolver_match and request.resolver_match.url_name == "messaging_delivery_changelist":
            queryset = queryset.defer("message__body", "message__headers", "message__properties",
                                      "message__last_error", "error", "body")
        return calendar(queryset)

    def get_search_results(self, request, queryset, search_term):
        """Exact matches only: the deliveries on a queue, or those of the message with a message_id."""
        term = search_term.strip()
        if not term:
            return queryset, False
        message_pk = Message.objects.filter(message_id=term).values_list("pk", flat=True).first()
        by_queue = queryset.filter(queue=term)
        return (by_queue | queryset.filter(message_id=message_pk)) if message_pk else by_queue, False

    @admin.display(description="letter", ordering="message__created_at")
    def message_link(self, obj):
        return format_html('<a href="{}">{}</a>', reverse("admin:messaging_message_change", args=[obj.message_id]),
                           obj.message.message_id)

    @admin.display(description="body delivered")
    def delivered_body(self, obj):
        if obj.body is None:
            return "the letter's body" if obj.body_sha256 else "—"
        body = bytes(obj.body)
        text, encoding = body_text(body[:4096])
        suffix = f" … ({len(body):,} bytes in all)" if len(body) > 4096 else ""
        return format_html("<pre>{}</pre>{}", text if encoding == "utf-8" else f"base64: {text}", suffix)

    def get_urls(self):
        # Before the model's own "<path:object_id>/" pages, which would take these paths.
        view = self.admin_site.admin_view
        return [
            path("dead-letters/", view(self.dead_letters), name="messaging_delivery_dead_letters"),
            path("dead-letters/<queue:queue>/", view(self.dead_letters), name="messaging_delivery_dead_letter_queue"),
            *super().get_urls(),
        ]

    def dead_letters(self, request, queue: str | None = None):
        """The dead-letter queues, or what is in one grouped by original queue and reason (as /dead-letters/)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "queue": queue,
                   "title": f"Dead letters in {queue}" if queue else "Dead-letter queues", "queues": None,
                   "found": None, "error": "", "notice": peeking.NOTICE}
        status = 200
        try:
            if queue is None:
                context["queues"] = deadletters.dead_letter_queues()
            else:
                context["found"] = deadletters.contents(queue)
                if context["found"] is None:
                    context["error"], status = "There is no queue with this name.", 404
        except ManagementUnavailable as exc:
            context["error"], status = str(exc), 503
        except ManagementRefused as exc:
            context["error"], status = str(exc), 409
        return TemplateResponse(request, "admin/messaging/delivery/dead_letters.html", context, status=status)
