"""`manage.py diffsettings`, with secrets hidden as on the DEBUG error page.

Django's own command prints every value as it is, SECRET_KEY and the passwords inside RABBITMQ_URL
and DATABASES included; this one shows them as '********************' or `user:***@`.
"""
from __future__ import annotations

from django.core.management.commands import diffsettings

from messaging.logging import SecretsExceptionReporterFilter


def masked_module_to_dict(module, omittable=lambda k: k.startswith("_") or not k.isupper()) -> dict[str, str]:
    """Like Django's `module_to_dict`, with each value cleansed before its repr."""
    report_filter = SecretsExceptionReporterFilter()
    return {
        k: repr(report_filter.cleanse_setting(k, getattr(module, k))) for k in dir(module) if not omittable(k)
    }


class Command(diffsettings.Command):
    help = diffsettings.Command.help + " Secrets and URL passwords are masked."

    def handle(self, **options):
        original = diffsettings.module_to_dict
        diffsettings.module_to_dict = masked_module_to_dict
        try:
            return super().handle(**options)
        finally:
            diffsettings.module_to_dict = original
