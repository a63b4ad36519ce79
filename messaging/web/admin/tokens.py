"""The ApiToken admin: tokens are seen and revoked here; `manage.py create_api_token` issues them."""
from __future__ import annotations

from django.contrib import admin

from messaging.models import ApiToken
from messaging.web.admin.base import SelectionChecked, timestamp


@admin.register(ApiToken)
class ApiTokenAdmin(SelectionChecked, admin.ModelAdmin):
    """Tokens are issued by a command (the key is shown once); here they are seen and revoked (deleted)."""

    list_display = ["name", "user", "created", "last_used"]
    list_select_related = ["user"]
    readonly_fields = ["key_sha256", "created", "last_used"]
    fields = ["name", "user", "key_sha256", "created", "last_used"]
    raw_id_fields = ["user"]

    created = timestamp("created_at")
    last_used = timestamp("last_used_at")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
