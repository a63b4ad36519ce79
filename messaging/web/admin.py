"""Django admin as an audit tool: the history is shown, never edited, and stays fast at a million rows.

Deletion happens only through retention (`manage.py prune`). Lists never count the whole table
(CappedCountPaginator, `show_full_result_count = False`), filters are index-backed (no
`SELECT DISTINCT` of a column to build choices), search is by exact values, and the per-letter
delivery figures are correlated subqueries on the (message, queue, status) index.
"""
from __future__ import annotations

import base64
import csv
import json
import logging
from collections import Counter
from datetime import datetime, timedelta

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models, transaction
from django.db.models import Count, IntegerField, Max, Min, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from messaging.errors import InvalidMessage
from messaging.models import ApiToken, Delivery, Message, Worker
from messaging.outbox.publishing import republish
from messaging.web.counting import (
    RECENT_DELIVERIES,
    CappedCountPaginator,
    recently_delivered,
)

logger = logging.getLogger(__name__)

# Republishing is a publish per letter: keep one action to a size a confirmation page can show.
REPUBLISH_LIMIT = 100
EXPORT_CHUNK = 2000


# --- building blocks -------------------------------------------------------------------------
class SelectionChecked:
    """An admin whose actions refuse a selection that is not ids (anything else failed in `pk__in`: a 500)."""

    def response_action(self, request, queryset, **kwargs):
        selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
        if not all(value.isascii() and value.isdigit() and int(value) < 2**63 for value in selected):
            self.message_user(request, "The selection is not a list of rows of this page.", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        return super().response_action(request, queryset, **kwargs)


class ReadOnlyAdmin(SelectionChecked, admin.ModelAdmin):
    """History: viewable by whoever has the view permission, never added, changed or deleted here."""

    paginator = CappedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # a count per filter choice is a scan of the table each
    list_per_page = 50

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_changelist_instance(self, request):
        # Django's date hierarchy builds its range without a check: ?created_at__year=9999 raised
        # ValueError (the year 10000), with &created_at__month=12 OverflowError — a 500. Bad lookup
        # parameters are Django's own "?e=1" page instead, as for any other.
        try:
            return super().get_changelist_instance(request)
        except (ValueError, OverflowError) as exc:
            logger.warning("admin list %s: lookup parameters refused (%s: %s)", request.path,
                           exc.__class__.__name__, exc)
            raise IncorrectLookupParameters(exc) from exc


class CalendarQuerySet(models.QuerySet):
    """A queryset for the admin's date hierarchy that never reads every matching row.

    The hierarchy asks for `SELECT DISTINCT date_trunc(...)` over the filtered rows, a full scan at
    a million letters. Here the first and last matching row come from the index (every filter of
    these lists is index-backed or a short list of ids), and every period between them is offered.
    """

    def datetimes(self, field_name, kind, order="ASC", tzinfo=None):
        bounds = self.order_by().aggregate(first=Min(field_name), last=Max(field_name))
        if not bounds["first"]:
            return []
        first, last = (timezone.localtime(bounds[k]) for k in ("first", "last"))
        periods, current = [], first.replace(hour=0, minute=0, second=0, microsecond=0)
        if kind in ("month", "year"):
            current = current.replace(day=1)
        if kind == "year":
            current = current.replace(month=1)
        while current <= last:
            periods.append(current)
            if kind == "day":
                current = (current + timedelta(days=1)).replace(hour=0)
            elif kind == "month":
                current = current.replace(year=current.year + current.month // 12, month=current.month % 12 + 1)
            else:
                current = current.replace(year=current.year + 1)
        return periods

    dates = datetimes


def calendar(queryset) -> CalendarQuerySet:
    return CalendarQuerySet(model=queryset.model, query=queryset.query, using=queryset._db, hints=queryset._hints)


class ValueFilter(admin.SimpleListFilter):
    """A free-text filter (exact match): a list of choices would need a DISTINCT over the whole table."""

    template = "admin/messaging/value_filter.html"

    def lookups(self, request, model_admin):
        return ()

    def has_output(self):
        return True

    def choices(self, changelist):
        yield {
            "value": self.value() or "",
            "parameter_name": self.parameter_name,
            "clear": changelist.get_query_string(remove=[self.parameter_name]),
            "others": [
                (k, v) for k, values in changelist.params.items() if k != self.parameter_name
                for v in (values if isinstance(values, list) else [values])
            ],
        }


class ExchangeFilter(ValueFilter):
    title = "exchange (exact; empty for the default exchange: -)"
    parameter_name = "exchange"

    def queryset(self, request, queryset):
        value = self.value()
        if value is None or value == "":
            return queryset
        return queryset.filter(exchange="" if value == "-" else value)


class QueueFilter(ValueFilter):
    title = "delivered on queue (latest {:,} deliveries)".format(RECENT_DELIVERIES)
    parameter_name = "queue"

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        return queryset.filter(pk__in=recently_delivered(queue=self.value()))


class DeliveryQueueFilter(ValueFilter):
    title = "queue"
    parameter_name = "queue"

    def queryset(self, request, queryset):
        return queryset.filter(queue=self.value()) if self.value() else queryset


class DeliveryStatusFilter(admin.SimpleListFilter):
    title = "a delivery that was (latest {:,})".format(RECENT_DELIVERIES)
    parameter_name = "delivery_status"

    def lookups(self, request, model_admin):
        return Delivery.Status.choices

    def queryset(self, request, queryset):
        if self.value() not in Delivery.Status.values:
            return queryset
        return queryset.filter(pk__in=recently_delivered(status=self.value()))


def with_delivery_summary(queryset):
    """Annotate each letter with its number of deliveries and its last one (status, time)."""
    deliveries = Delivery.objects.filter(message=OuterRef("pk"))
    last = deliveries.order_by("-received_at", "-id")
    return queryset.annotate(
        delivery_count=Coalesce(
            Subquery(deliveries.order_by().values("message").annotate(n=Count("id")).values("n")[:1]),
            Value(0), output_field=IntegerField(),
        ),
        last_delivery_status=Subquery(last.values("status")[:1]),
        last_delivered_at=Subquery(last.values("received_at")[:1]),
    )


def body_text(body: bytes) -> tuple[str, str]:
    """(text, encoding) for an export: UTF-8 text when it is, base64 otherwise."""
    try:
        text = body.decode("utf-8")
        if "\x00" not in text:
            return text, "utf-8"
    except UnicodeDecodeError:
        pass
    return base64.b64encode(body).decode("ascii"), "base64"


def csv_safe(value) -> str:
    """A cell a spreadsheet will not run as a formula (=, +, -, @ and control characters lead)."""
    text = "" if value is None else value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


EXPORT_FIELDS = [
    "message_id", "status", "origin", "exchange", "routing_key", "correlation_id", "content_type",
    "content_encoding", "delivery_mode", "headers", "properties", "body_size", "body_sha256", "body",
    "body_encoding", "published_by", "republished_from", "last_error", "created_at", "published_at",
    "delivery_count", "last_delivery_status", "last_delivered_at",
]
DELIVERY_EXPORT_FIELDS = [
    "queue", "attempt", "redelivered", "duplicate", "status", "exchange", "routing_key", "consumer_tag",
    "received_at", "handled_at", "settled_at", "error",
]


def export_rows(queryset, *, deliveries: bool = False):
    """Each selected letter as a dict, read in chunks so memory stays flat (deliveries: one query a chunk)."""
    # defer(None): the list's queryset defers body, headers...; read per letter they would be a query each.
    letters = with_delivery_summary(queryset.defer(None).select_related("published_by", "republished_from"))
    letters = letters.order_by("-created_at", "-id")
    if deliveries:
        letters = letters.prefetch_related(
            models.Prefetch("deliveries", queryset=Delivery.objects.order_by("received_at", "id")))
    for letter in letters.iterator(chunk_size=EXPORT_CHUNK):
        body, encoding = body_text(bytes(letter.body))
        row = {f: getattr(letter, f, None) for f in EXPORT_FIELDS}
        row.update(
            body=body, body_encoding=encoding,
            published_by=letter.published_by.get_username() if letter.published_by else "",
            republished_from=letter.republished_from.message_id if letter.republished_from else "",
        )
        yield letter, row


class Echo:
    def write(self, value):
        return value


# --- letters ---------------------------------------------------------------------------------
class DeliveryInline(admin.TabularInline):
    """The letter's latest `LATEST` deliveries (see `MessageAdmin.get_formset_kwargs`); all of them
    are in the Delivery list (search by the letter's message_id)."""

    LATEST = 100
    model = Delivery
    verbose_name_plural = f"deliveries (the latest {LATEST}; all of them in the Delivery list, by message_id)"
    extra = 0
    can_delete = False
    fields = ["queue", "attempt", "redelivered", "duplicate", "status", "worker", "exchange", "routing_key",
              "received_at", "handled_at", "settled_at", "error"]
    readonly_fields = fields
    show_change_link = True
    ordering = ["received_at", "id"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("worker")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ["message_id", "status", "exchange_name", "routing_key", "origin", "deliveries",
                    "last_delivery", "last_delivered", "published_by", "created_at"]
    list_filter = ["status", "origin", ExchangeFilter, QueueFilter, DeliveryStatusFilter]
    search_fields = ["message_id"]  # exact message_id, correlation_id or routing key: see get_search_results
    search_help_text = "Exact message_id, correlation_id or routing key."
    date_hierarchy = "created_at"
    list_select_related = ["published_by"]
    sortable_by = ["created_at"]
    ordering = ["-created_at", "-id"]
    inlines = [DeliveryInline]
    actions = ["republish_letters", "export_csv", "export_json"]
    readonly_fields = ["message_id", "status", "origin", "published_by", "last_error", "attempts",
                       "next_attempt_at", "created_at", "published_at", "exchange", "exchange_type", "routing_key",
                       "declare", "lineage", "content_type", "content_encoding", "correlation_id", "delivery_mode",
                       "headers", "properties", "body_size", "body_sha256", "body_preview"]
    fieldsets = [
        ("Publish outcome", {"fields": ["message_id", "status", "origin", "published_by", "created_at",
                                        "published_at", "attempts", "next_attempt_at", "last_error", "lineage"]}),
        ("Destination", {"fields": ["exchange", "exchange_type", "routing_key", "declare"]}),
        ("Content", {"fields": ["content_type", "content_encoding", "correlation_id", "delivery_mode", "headers",
                                "properties", "body_size", "body_sha256", "body_preview"]}),
    ]

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
        """Exact matches only, each on its own index (admin's `=` would be a case-insensitive scan)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(message_id=term) | queryset.filter(correlation_id=term) | queryset.filter(
            routing_key=term), False

    @admin.display(description="exchange")
    def exchange_name(self, obj):
        return obj.exchange or "(default)"

    @admin.display(description="deliveries")
    def deliveries(self, obj):
        return obj.delivery_count

    @admin.display(description="last delivery")
    def last_delivery(self, obj):
        return obj.last_delivery_status or "—"

    @admin.display(description="last delivered at")
    def last_delivered(self, obj):
        return obj.last_delivered_at

    @admin.display(description="lineage")
    def lineage(self, obj):
        links = []
        if obj.republished_from_id:
            links.append(("republished from", obj.republished_from))
        links += [("republished as", copy) for copy in obj.republications.only("pk", "message_id")[:20]]
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
    def republish_letters(self, request, queryset):
        letters = list(queryset.defer("body").order_by("created_at", "id")[: REPUBLISH_LIMIT + 1])
        if len(letters) > REPUBLISH_LIMIT:
            self.message_user(request, f"Select at most {REPUBLISH_LIMIT} letters to republish at once.", messages.ERROR)
            return None
        if request.POST.get("confirmed") != "yes":
            return TemplateResponse(request, "admin/messaging/message/republish_confirmation.html", {
                **self.admin_site.each_context(request), "title": "Republish these letters?", "letters": letters,
                "opts": self.model._meta, "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                "select_across": request.POST.get("select_across", "0"),
            })
        copies, refused = [], []
        for original in Message.objects.filter(pk__in=[m.pk for m in letters]).order_by("created_at", "id"):
            try:
                with transaction.atomic():
                    copies.append(republish(original, user=request.user))
            except InvalidMessage as exc:  # e.g. a letter from another producer over MAILROOM_MAX_BODY_BYTES
                refused.append(f"{original.message_id}: {exc}")
        for reason in refused[:10]:
            self.message_user(request, f"Not republished: {reason}", messages.ERROR)
        if len(refused) > 10:
            self.message_user(request, f"… and {len(refused) - 10} more not republished.", messages.ERROR)
        for copy in copies:
            copy.refresh_from_db(fields=["status"])
        outcome = Counter(c.status for c in copies)
        logger.info("republished count=%s by=%s outcome=%s", len(copies), request.user.pk, dict(outcome))
        self.message_user(request, f"Republished {len(copies)} letter(s): " + ", ".join(
            f"{n} {status}" for status, n in sorted(outcome.items())), messages.SUCCESS)
        return None

    @admin.action(description="Export the selected letters as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        writer = csv.writer(Echo())

        def lines():
            yield writer.writerow(EXPORT_FIELDS)
            for _, row in export_rows(queryset):
                yield writer.writerow([csv_safe(json.dumps(row[f], cls=DjangoJSONEncoder) if f in ("headers", "properties")
                                                else row[f]) for f in EXPORT_FIELDS])
        logger.info("export format=csv by=%s", request.user.pk)
        response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="letters-{timezone.now():%Y%m%dT%H%M%S}.csv"'
        return response

    @admin.action(description="Export the selected letters as JSON (with their deliveries)", permissions=["view"])
    def export_json(self, request, queryset):
        encoder = DjangoJSONEncoder()

        def chunks():
            yield "["
            first = True
            for letter, row in export_rows(queryset, deliveries=True):
                row["deliveries"] = [{f: getattr(d, f) for f in DELIVERY_EXPORT_FIELDS} for d in letter.deliveries.all()]
                yield ("" if first else ",") + "\n" + encoder.encode(row)
                first = False
            yield "\n]\n"
        logger.info("export format=json by=%s", request.user.pk)
        response = StreamingHttpResponse(chunks(), content_type="application/json")
        response["Content-Disposition"] = f'attachment; filename="letters-{timezone.now():%Y%m%dT%H%M%S}.json"'
        return response


# --- deliveries, workers, tokens ----------------------------------------------------------------
@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    list_display = ["id", "letter", "queue", "attempt", "redelivered", "duplicate", "status", "worker",
                    "received_at", "settled_at"]
    list_filter = ["status", DeliveryQueueFilter, "redelivered"]
    search_fields = ["queue"]  # exact message_id or queue: see get_search_results
    search_help_text = "Exact message_id of the letter, or queue name."
    date_hierarchy = "received_at"
    list_select_related = ["message", "worker"]
    sortable_by = ["received_at"]
    ordering = ["-received_at", "-id"]
    readonly_fields = ["letter", "queue", "consumer_tag", "delivery_tag", "redelivered", "attempt", "duplicate",
                       "exchange", "routing_key", "status", "worker", "received_at", "handled_at", "settled_at", "error"]
    fields = readonly_fields

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.resolver_match and request.resolver_match.url_name == "messaging_delivery_changelist":
            queryset = queryset.defer("message__body", "message__headers", "message__properties",
                                      "message__last_error", "error")
        return calendar(queryset)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        message_pk = Message.objects.filter(message_id=term).values_list("pk", flat=True).first()
        by_queue = queryset.filter(queue=term)
        return (by_queue | queryset.filter(message_id=message_pk)) if message_pk else by_queue, False

    @admin.display(description="letter", ordering="message__created_at")
    def letter(self, obj):
        return format_html('<a href="{}">{}</a>', reverse("admin:messaging_message_change", args=[obj.message_id]),
                           obj.message.message_id)


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ["host", "pid", "queues", "status", "alive", "started_at", "heartbeat_at", "stopped_at",
                    "acked", "requeued", "rejected"]
    list_filter = ["status"]
    readonly_fields = ["host", "pid", "queues", "status", "started_at", "heartbeat_at", "stopped_at",
                       "acked", "requeued", "rejected"]

    @admin.display(boolean=True, description="alive")
    def alive(self, obj):
        return obj.alive


@admin.register(ApiToken)
class ApiTokenAdmin(SelectionChecked, admin.ModelAdmin):
    """Tokens are issued by a command (the key is shown once); here they are seen and revoked (deleted)."""

    list_display = ["name", "user", "created_at", "last_used_at"]
    list_select_related = ["user"]
    readonly_fields = ["key_sha256", "created_at", "last_used_at"]
    raw_id_fields = ["user"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
