"""The Worker admin: each `consume` process, its queues, heartbeat and counts, read-only."""
from __future__ import annotations

from django.contrib import admin

from messaging.models import Worker
from messaging.web.admin.base import ReadOnlyAdmin, timestamp


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ["host", "pid", "status", "alive", "queues", "started", "heartbeat", "stopped",
                    "acked", "requeued", "rejected"]
    list_filter = ["status"]
    readonly_fields = ["host", "pid", "queues", "status", "started", "heartbeat", "stopped",
                       "acked", "requeued", "rejected"]
    fields = readonly_fields

    started = timestamp("started_at")
    heartbeat = timestamp("heartbeat_at")
    stopped = timestamp("stopped_at")

    @admin.display(boolean=True, description="alive")
    def alive(self, obj):
        return obj.alive
