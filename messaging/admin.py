"""Django admin as an audit tool: history is shown, never edited."""
from __future__ import annotations

from django.contrib import admin

from messaging.models import ApiToken, Delivery, Message, Worker


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class DeliveryInline(admin.TabularInline):
    model = Delivery
    extra = 0
    can_delete = False
    fields = ["queue", "attempt", "redelivered", "duplicate", "status", "worker", "received_at", "settled_at", "error"]
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ["message_id", "status", "exchange", "routing_key", "origin", "published_by", "created_at", "published_at"]
    list_filter = ["status", "origin", "exchange", "created_at"]
    search_fields = ["=message_id", "=routing_key", "=correlation_id"]
    date_hierarchy = "created_at"
    list_select_related = ["published_by"]
    show_full_result_count = False
    inlines = [DeliveryInline]
    exclude = ["body"]


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    list_display = ["id", "message", "queue", "attempt", "redelivered", "status", "received_at", "settled_at"]
    list_filter = ["status", "queue", "redelivered", "received_at"]
    search_fields = ["=message__message_id", "=routing_key"]
    date_hierarchy = "received_at"
    list_select_related = ["message"]
    show_full_result_count = False
    raw_id_fields = ["message", "worker"]


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ["host", "pid", "queues", "status", "started_at", "heartbeat_at", "acked", "requeued", "rejected"]
    list_filter = ["status", "host"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "created_at", "last_used_at"]
    readonly_fields = ["key_sha256", "created_at", "last_used_at"]
