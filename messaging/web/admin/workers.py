"""The Worker admin: each `consume` process, its queues, heartbeat and counts, read-only."""
from __future__ import annotations

from django.contrib import admin

from messaging.models import Worker
from messaging.web.admin.base import ReadOnlyAdmin


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
