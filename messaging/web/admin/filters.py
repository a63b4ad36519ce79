"""List filters that stay index-backed: values typed in and matched exactly, never choices from a DISTINCT."""
from __future__ import annotations

from django.contrib import admin

from messaging.models import BODY_ANOMALIES, ROUTE_ANOMALIES, Delivery
from messaging.web.counting import RECENT_DELIVERIES, recently_delivered


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


class AnomalyFilter(admin.SimpleListFilter):
    """Deliveries that may not be their letter's: another body under its message_id, or an unrouted queue."""

    title = "forged or mismatched"
    parameter_name = "anomaly"

    def lookups(self, request, model_admin):
        return [("any", "forged/mismatched (any)"), ("body", "body differs from the letter's"),
                ("route", "not routed here by the letter's publish")]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "any":
            return queryset.exclude(anomaly=Delivery.Anomaly.NONE)
        if value in ("body", "route"):
            return queryset.filter(anomaly__in=BODY_ANOMALIES if value == "body" else ROUTE_ANOMALIES)
        return queryset


class DeathReasonFilter(admin.SimpleListFilter):
    """Deliveries of dead-lettered copies (x-death), by reason: served by a partial index of those alone."""

    title = "dead-lettered (x-death)"
    parameter_name = "death_reason"

    def lookups(self, request, model_admin):
        return [("any", "dead-lettered (any reason)"),
                *((value, label) for value, label in Delivery.DeathReason.choices if value)]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "any":
            return queryset.exclude(death_reason="")
        if value in Delivery.DeathReason.values and value:
            return queryset.filter(death_reason=value)
        return queryset


class DeadLetteredFromFilter(ValueFilter):
    title = "dead-lettered from queue (exact)"
    parameter_name = "dead_lettered_from"

    def queryset(self, request, queryset):
        # `death_reason` is set whenever `dead_lettered_from` is: the partial index serves this too.
        return queryset.exclude(death_reason="").filter(dead_lettered_from=self.value()) if self.value() else queryset
