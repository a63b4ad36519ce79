"""`manage.py roles`: (re)create the publisher and auditor groups; `--grant USER ROLE` gives one to a user."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from messaging.roles import ROLES, ensure_roles


class Command(BaseCommand):
    help = "Create or reset the roles (groups) publisher and auditor; optionally grant one to a user."

    def add_arguments(self, parser):
        parser.add_argument("--grant", nargs=2, metavar=("USER", "ROLE"),
                            help="Add USER to ROLE and let them log in to the admin (is_staff).")

    def handle(self, *args, **options):
        ensure_roles()
        self.stdout.write(f"Roles ready: {', '.join(sorted(ROLES))}.")
        if options["grant"]:
            username, role = options["grant"]
            if role not in ROLES:
                raise CommandError(f"unknown role {role!r}; choose from {', '.join(sorted(ROLES))}")
            try:
                user = get_user_model().objects.get_by_natural_key(username)
            except get_user_model().DoesNotExist:
                raise CommandError(f"no user {username!r}") from None
            user.groups.add(Group.objects.get(name=role))
            if not user.is_staff:
                user.is_staff = True
                user.save(update_fields=["is_staff"])
            self.stdout.write(f"{username} is now a {role} (and may log in to the admin).")
