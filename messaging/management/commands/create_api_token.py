"""`manage.py create_api_token USERNAME --name NAME [--expires-in 30d]`: a bearer token for a service (shown once)."""
from __future__ import annotations

import re
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from messaging.web.api import create_token

_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"(\d{1,6})([mhdw])")


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m` or `2w` as a timedelta; CommandError for anything else."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or int(match[1]) == 0:
        raise CommandError(f"--expires-in takes a number and a unit (m, h, d or w), e.g. 30d, not {text!r}.")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


class Command(BaseCommand):
    help = ("Create an API token acting as USERNAME (with that user's permissions). The key is printed once; "
            "only its sha256 is stored. The token stops working when it expires, when an admin revokes it, "
            "or when the user's password changes.")

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", required=True, help="What the token is for, e.g. the calling service.")
        parser.add_argument("--expires-in", metavar="DURATION",
                            help="Refuse the token after this long: 90m, 12h, 30d, 2w (default: never).")

    def handle(self, *args, **options):
        expires_at = None
        if options["expires_in"] is not None:
            expires_at = timezone.now() + parse_duration(options["expires_in"])
        try:
            user = get_user_model().objects.get(username=options["username"])
        except get_user_model().DoesNotExist:
            raise CommandError(f"No user {options['username']!r}.") from None
        _, key = create_token(user=user, name=options["name"], expires_at=expires_at)
        self.stdout.write(key)
