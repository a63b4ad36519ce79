"""The Message admin: the history of messages with their latest deliveries, republish and export actions."""
from __future__ import annotations

import logging
from collections import Counter

from django.contrib import admin
from django.contrib import messages as flash
from django.db import transaction
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from messaging.errors import InvalidMessage
from messaging.models import Delivery, Message
from messaging.outbox.publishing import republish, republish_notes
from messaging.search import search
from messaging.web.admin.base import (
    ReadOnly,
    ReadOnlyAdmin,
    calendar,
    json_block,
    timestamp,
)
from messaging.web.admin.exports import (
    body_text,
    csv_response,
    json_response,
    with_delivery_summary,
)
from messaging.web.admin.filters import (
    DeliveryStatusFilter,
    ExchangeFilter,
    QueueFilter,
)
from messaging.web.display import shown_time

logger = logging.getLogger(__name__)

# Republishing is a publish per message: keep one action to a size a confirmation page can show.
REPUBLISH_LIMIT = 100


class DeliveryInline(ReadOnly, admin.TabularInline):
    """The message's latest `LATEST` deliveries (see `MessageAdmin.get_formset_kwargs`); all of them
    are in the Delivery list (search by the message's message_id)."""

    LATEST = 100
    model = Delivery
    verbose_name_plural = f"deliveries (the latest {LATEST}; all of them in the Delivery list, by message_id)"
    extra = 0
    can_delete = False
    fields = ["queue", "attempt", "redelivered", "duplicate", "status", "worker", "exchange", "routing_key",
              "received", "handled", "settled", "retry_delay", "death", "error"]
    readonly_fields = fields
    show_change_link = True
    ordering = ["received_at", "id"]

    received = timestamp("received_at")
    handled = timestamp("handled_at")
    settled = timestamp("settled_at")

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("worker")

    @admin.display(description="dead-lettered (x-death)")
    def death(self, obj):
        if not obj.death_reason:
            return "—"
        return (f"{obj.get_death_reason_display()} from {obj.dead_lettered_from} ×{obj.death_count}, "
                f"{shown_time(obj.died_at)}")


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ["message_id", "status", "exchange_name", "routing_key", "origin", "deliveries",
                    "last_delivery", "last_delivered", "created"]
    list_filter = ["status", "origin", ExchangeFilter, QueueFilter, DeliveryStatusFilter]
    search_fields = ["message_id"]  # exact ids and words: see get_search_results
    search_help_text = ("Exact message_id, correlation_id or routing key, or words of a text body and of header "
                        "values (all of them).")
    date_hierarchy = "created_at"
    sortable_by = ["created"]
    ordering = ["-created_at", "-id"]
    inlines = [DeliveryInline]
    actions = ["republish_messages", "export_csv", "export_json"]
    readonly_fields = ["message_id", "status", "origin", "published_by", "last_error", "attempts",
                       "next_attempt", "created", "published", "exchange", "exchange_type", "routing_key",
                       "declare", "lineage", "content_type", "content_encoding", "correlation_id", "delivery_mode",
                       "headers_json", "properties_json", "body_size", "body_sha256", "body_preview"]
    fieldsets = [
        ("Publish outcome", {"fields": ["message_id", "status", "origin", "published_by", "created",
                                        "published", "attempts", "next_attempt", "last_error", "lineage"]}),
        ("Destination", {"fields": ["exchange", "exchange_type", "routing_key", "declare"]}),
        ("Content", {"fields": ["content_type", "content_encoding", "correlation_id", "delivery_mode", "headers_json",
                                "properties_json", "body_size", "body_sha256", "body_preview"]}),
    ]

    created = timestamp("created_at", sortable=True)
    published = timestamp("published_at")
    next_attempt = timestamp("next_attempt_at")
    headers_json = json_block("headers", description="headers")
    properties_json = json_block("properties", description="properties")

    def get_formset_kwargs(self, request, obj, inline, prefix):
        kwargs = super().get_formset_kwargs(request, obj, inline, prefix)
        if isinstance(inline, DeliveryInline) and obj is not None and obj.pk:
            # Another producer may send one message_id again and again: never a form per delivery.
            latest = Delivery.objects.filter(message=obj).newest_first().values_list("pk", flat=True)
            kwargs["queryset"] = kwargs["queryset"].filter(pk__in=list(latest[:inline.LATEST]))
        return kwargs

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.resolver_match and request.resolver_match.url_name == "messaging_message_changelist":
            queryset = with_delivery_summary(queryset.defer("body", "headers", "properties", "last_error"))
        return calendar(queryset)

    def get_search_results(self, request, queryset, search_term):
        """The exact ids and the words of bodies and headers, each on its own index (`messaging.search`)."""
        return search(queryset, search_term), False

    @admin.display(description="exchange")
    def exchange_name(self, obj):
        return obj.exchange or "(default)"

    @admin.display(description="deliveries")
    def deliveries(self, obj):
        return obj.delivery_count

    @admin.display(description="last delivery")
    def last_delivery(self, obj):
        return obj.last_delivery_status or "—"

    @admin.display(description="last delivered")
    def last_delivered(self, obj):
        return shown_time(obj.last_delivered_at)

    @admin.display(description="lineage")
    def lineage(self, obj):
        links = []
        if obj.republished_from_id:
            links.append(("republished from", obj.republished_from))
        links += [("republished as", copy) for copy in obj.republications.only("pk", "message_id")[:20]]
        if obj.in_reply_to_id:
            links.append(("in reply to", Message.objects.only("pk", "message_id").get(pk=obj.in_reply_to_id)))
        links += [("replied to by", reply) for reply in obj.replies.only("pk", "message_id")[:20]]
        return format_html_join(
            ", ", '{} <a href="{}">{}</a>',
            ((label, reverse("admin:messaging_message_change", args=[m.pk]), m.message_id) for label, m in links),
        ) or "—"

    @admin.display(description="body")
    def body_preview(self, obj):
        body = bytes(obj.body)
        text, encoding = body_text(body[:4096])
        suffix = f" … ({len(body):,} bytes in all)" if len(body) > 4096 else ""
        return format_html("<pre>{}</pre>{}", text if encoding == "utf-8" else f"base64: {text}", suffix)

    # --- actions ---
    def has_publish_permission(self, request):
        return request.user.has_perm("messaging.add_message")

    @admin.action(description="Republish the selected letters (new copies, with lineage)", permissions=["publish"])
    def republish_messages(self, request, queryset):
        selected = list(queryset.defer("body").order_by("created_at", "id")[: REPUBLISH_LIMIT + 1])
        if len(selected) > REPUBLISH_LIMIT:
            self.message_user(request, f"Select at most {REPUBLISH_LIMIT} letters to republish at once.", flash.ERROR)
            return None
        if request.POST.get("confirmed") != "yes":
            for message in selected:  # what each copy cannot send exactly as it was received
                message.republish_notes = republish_notes(message)
            return TemplateResponse(request, "admin/messaging/message/republish_confirmation.html", {
                **self.admin_site.each_context(request), "title": "Republish these letters?", "selected": selected,
                "opts": self.model._meta, "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                "select_across": request.POST.get("select_across", "0"),
            })
        copies, refused = [], []
        for original in Message.objects.filter(pk__in=[m.pk for m in selected]).order_by("created_at", "id"):
            try:
                with transaction.atomic():
                    copies.append(republish(original, user=request.user))
            except InvalidMessage as exc:  # e.g. a message from another producer over MAILROOM_MAX_BODY_BYTES
                refused.append(f"{original.message_id}: {exc}")
        for reason in refused[:10]:
            self.message_user(request, f"Not republished: {reason}", flash.ERROR)
        if len(refused) > 10:
            self.message_user(request, f"… and {len(refused) - 10} more not republished.", flash.ERROR)
        for copy in copies:
            copy.refresh_from_db(fields=["status"])
        outcome = Counter(c.status for c in copies)
        logger.info("republished count=%s by=%s outcome=%s", len(copies), request.user.pk, dict(outcome))
        self.message_user(request, f"Republished {len(copies)} letter(s): " + ", ".join(
            f"{n} {status}" for status, n in sorted(outcome.items())), flash.SUCCESS)
        return None

    @admin.action(description="Export the selected letters as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        logger.info("export format=csv by=%s", request.user.pk)
        return csv_response(queryset)

    @admin.action(description="Export the selected letters as JSON (with their deliveries)", permissions=["view"])
    def export_json(self, request, queryset):
        logger.info("export format=json by=%s", request.user.pk)
        return json_response(queryset)
