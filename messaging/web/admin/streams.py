"""The StreamOffset admin: how far each stream tap has recorded its stream, read-only."""
from __future__ import annotations

from django.contrib import admin

from messaging.models import StreamOffset
from messaging.web.admin.base import ReadOnlyAdmin, timestamp


@admin.register(StreamOffset)
class StreamOffsetAdmin(ReadOnlyAdmin):
    list_display = ["stream", "tap", "offset", "updated"]
    search_fields = ["=stream", "=tap"]
    search_help_text = "Exact stream or tap name."
    readonly_fields = ["stream", "tap", "offset", "updated"]
    fields = readonly_fields
    ordering = ["stream", "tap"]

    updated = timestamp("updated_at")
