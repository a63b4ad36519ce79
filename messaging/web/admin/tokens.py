"""The ApiToken admin: tokens are seen and revoked here; `manage.py create_api_token` issues them."""
from __future__ import annotations

from django.contrib import admin
from django.contrib import messages as flash
from django.template.response import TemplateResponse
from django.utils import timezone

from messaging.models import ApiToken
from messaging.web.admin.base import SelectionChecked, timestamp
from messaging.web.api.auth import revoke_tokens


class TokenState(admin.SimpleListFilter):
    """Tokens by whether they still work: active, expired or revoked."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "active"), ("expired", "expired"), ("revoked", "revoked")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True).exclude(expires_at__lte=now)
        return queryset


@admin.register(ApiToken)
class ApiTokenAdmin(SelectionChecked, admin.ModelAdmin):
    """Tokens are issued by a command (the key is shown once); here they are seen and revoked (kept, for the trail)."""

    list_display = ["name", "user", "state", "created", "expires", "revoked", "last_used"]
    list_select_related = ["user"]
    list_filter = [TokenState]
    readonly_fields = ["key_sha256", "state", "created", "expires", "revoked", "last_used"]
    fields = ["name", "user", "key_sha256", "state", "created", "expires", "revoked", "last_used"]
    raw_id_fields = ["user"]
    actions = ["revoke"]

    created = timestamp("created_at")
    expires = timestamp("expires_at")
    revoked = timestamp("revoked_at")
    last_used = timestamp("last_used_at")

    @admin.display(description="state")
    def state(self, obj: ApiToken) -> str:
        return obj.state()

    @admin.action(description="Revoke the selected tokens (they stay listed)", permissions=["delete"])
    def revoke(self, request, queryset):
        selected = list(queryset.select_related("user").order_by("name", "id"))
        if request.POST.get("confirmed") != "yes":
            return TemplateResponse(request, "admin/messaging/apitoken/revoke_confirmation.html", {
                **self.admin_site.each_context(request), "title": "Revoke these tokens?", "selected": selected,
                "opts": self.model._meta, "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            })
        count = revoke_tokens(queryset)
        self.message_user(request, f"Revoked {count} token(s); {len(selected) - count} were revoked already.",
                          flash.SUCCESS)
        return None

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
