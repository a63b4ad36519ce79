"""`manage.py ensure_admin`: create a first superuser when there is none, and say how to log in."""
from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the superuser 'admin' with a random password when no superuser exists, and print how to log in."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("A superuser exists; log in with it (manage.py changepassword NAME to reset).")
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(options["username"], password=password)
        self.stdout.write(self.style.SUCCESS(
            f"Created the superuser {options['username']!r} with password {password!r} — "
            "log in at http://127.0.0.1:8000/accounts/login/ and change it in the admin."
        ))
