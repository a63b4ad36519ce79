"""gunicorn's settings for Mailroom, read from the working directory (`gunicorn config.wsgi` in the Procfile
and docs/deployment.md): the web process refuses to start on a database without Mailroom's tables."""
import os


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
