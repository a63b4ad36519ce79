"""`manage.py create_api_token USERNAME --name NAME`: a bearer token for a service (shown once)."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from messaging.web.api import create_token


class Command(BaseCommand):
    help = ("Create an API token acting as USERNAME (with that user's permissions). The key is printed once; "
            "only its sha256 is stored.")

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", required=True, help="What the token is for, e.g. the calling service.")

    def handle(self, *args, **options):
        try:
            user = get_user_model().objects.get(username=options["username"])
        except get_user_model().DoesNotExist:
            raise CommandError(f"No user {options['username']!r}.") from None
        _, key = create_token(user=user, name=options["name"])
        self.stdout.write(key)
