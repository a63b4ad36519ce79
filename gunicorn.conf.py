"""gunicorn's settings for Mailroom, read from the working directory (`gunicorn config.wsgi` in the Procfile
and docs/deployment.md): the web process refuses to start on a database without Mailroom's tables, and
with MAILROOM_LOG_FORMAT=json gunicorn's own lines are JSON objects too.

With json (from the environment or `.env`, as config/settings.py reads it), gunicorn's start-up, worker
and access lines go through the same formatter and password mask as Django's records; with text,
gunicorn keeps its own format.
"""
import os
from pathlib import Path

import environ

environ.Env.read_env(Path(__file__).resolve().parent / ".env", overwrite=False)


def on_starting(server) -> None:
    """Exit 1 before listening when the database answers but was never migrated (`messaging.conf.unmigrated`).

    A database that does not answer is no reason to refuse: the pages and /healthz say so until it does.
    """
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.db import connections

    from messaging.conf import unmigrated

    problem = unmigrated()
    connections.close_all()  # the workers are forked from this process: they open their own
    if problem:
        raise RuntimeError(f"Mailroom cannot serve: {problem}")  # gunicorn prints it and exits 1


if os.environ.get("MAILROOM_LOG_FORMAT", "text").strip().lower() == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"mask_secrets": {"()": "messaging.logging.MaskSecretsFilter"}},
        "formatters": {"json": {"()": "messaging.logging.SecretsJsonFormatter"}},
        "handlers": {
            "error": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["mask_secrets"],
                      "stream": "ext://sys.stderr"},
            # --access-logfile - writes to stdout, as gunicorn does.
            "access": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["mask_secrets"],
                       "stream": "ext://sys.stdout"},
        },
        "root": {"level": "INFO", "handlers": ["error"]},
        "loggers": {
            # Not propagated: Django's LOGGING gives the root logger a handler of its own in each worker.
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }
