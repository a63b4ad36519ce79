"""`manage.py ensure_admin`: create a first superuser when there is none, and say how to log in."""
from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


def login_url() -> str:
    """Where `make run` serves the login page (MAILROOM_BIND, as the Procfile's web line uses it)."""
    bind = os.environ.get("MAILROOM_BIND", "127.0.0.1:8000")
    host, _, port = bind.rpartition(":")
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/accounts/login/"


class Command(BaseCommand):
    help = "Create the superuser 'admin' with a random password when no superuser exists, and print how to log in."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write(
                f"A superuser exists: log in with it at {login_url()} "
                "(python manage.py changepassword NAME sets a new password)."
            )
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(options["username"], password=password)
        self.stdout.write(self.style.SUCCESS(
            f"Created the superuser {options['username']!r} with password {password!r}: "
            f"log in at {login_url()} and change the password in the admin."
        ))
