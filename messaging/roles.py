"""The two roles that come out of the box, as groups: publisher and auditor."""
from __future__ import annotations

from django.apps import apps as global_apps

# Role name -> permission codenames of the `messaging` app.
ROLES: dict[str, tuple[str, ...]] = {
    # May publish (the form, the API, admin's republish) and sees the history.
    "publisher": ("add_message", "view_message", "view_delivery", "view_worker"),
    # Sees everything, publishes nothing, changes nothing.
    "auditor": ("view_message", "view_delivery", "view_worker", "view_apitoken"),
}


def ensure_roles(*, apps=global_apps) -> None:
    """Create (or reset) the role groups with exactly their permissions; `apps` may be a migration's."""
    from django.contrib.auth.management import create_permissions

    # On a fresh database the permissions are only created after `migrate`: create them now.
    create_permissions(global_apps.get_app_config("messaging"), apps=apps, verbosity=0)

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        permissions = list(Permission.objects.filter(content_type__app_label="messaging", codename__in=codenames))
        missing = set(codenames) - {p.codename for p in permissions}
        if missing:
            raise RuntimeError(f"role {name}: permissions missing: {sorted(missing)}")
        group.permissions.set(permissions)
