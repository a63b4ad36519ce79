"""Mailroom's settings, their defaults, and the system checks that catch a bad value at start-up."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.db import DEFAULT_DB_ALIAS, connections
from django.db import Error as DatabaseError
from django.urls import NoReverseMatch, reverse
from django.utils.module_loading import import_string

DEFAULTS: dict[str, Any] = {
    # Several brokers (a cluster) may be given, separated by commas; pika tries them in turn.
    "RABBITMQ_URL": "amqp://guest:guest@localhost:5672/%2F",
    # The management HTTP API; empty: pages fall back to passive declares.
    "RABBITMQ_MANAGEMENT_URL": "",
    # How long a web request may wait on the broker (connect, blocked connection, confirm).
    "MAILROOM_PUBLISH_TIMEOUT": 3.0,
    # Largest body accepted by the form, the API and `manage.py publish`.
    "MAILROOM_MAX_BODY_BYTES": 10 * 1024 * 1024,
    # A pending message is left to the request that wrote it for this long before the relay takes it.
    "MAILROOM_RELAY_GRACE_SECONDS": 10.0,
    # Queue name -> dotted path of a handler run by `consume` for each message.
    "MAILROOM_QUEUE_HANDLERS": {},
    # Bearer token for /metrics; empty: only logged-in staff may read it.
    "MAILROOM_METRICS_TOKEN": "",
    # Queues and exchanges Mailroom declares because they are missing survive a broker restart; off,
    # they are declared as the RabbitMQ tutorials declare theirs, so that the tutorials' code works
    # beside Mailroom (`consume --durable` / `--queue-type quorum` ask for it per worker).
    "MAILROOM_DURABLE": False,
}

# URL names the pages link to that the project provides: Django's admin and auth views.
PROJECT_URL_NAMES = ("login", "logout", "admin:index")
# The context processor that shows the broker's alarm banner on every page.
CONTEXT_PROCESSOR = "messaging.web.context_processors.broker_status"


def get(name: str) -> Any:
    """The project's value of the setting `name`, or Mailroom's default; read at each call."""
    return getattr(settings, name, DEFAULTS[name])


@register()
def check_settings(app_configs=None, **kwargs) -> list[Error]:
    """Refuse settings that would only fail later, at the first message."""
    errors = []
    for address in filter(None, (part.strip() for part in str(get("RABBITMQ_URL")).split(","))):
        if urlsplit(address).scheme not in ("amqp", "amqps"):
            errors.append(Error("RABBITMQ_URL must be amqp:// or amqps:// addresses, separated by commas.",
                                id="messaging.E001"))
            break
    for name in ("MAILROOM_PUBLISH_TIMEOUT", "MAILROOM_RELAY_GRACE_SECONDS", "MAILROOM_MAX_BODY_BYTES"):
        value = get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            errors.append(Error(f"{name} must be a positive number.", id="messaging.E002"))
    if not isinstance(get("MAILROOM_DURABLE"), bool):
        errors.append(Error("MAILROOM_DURABLE must be True or False.", id="messaging.E005"))
    handlers = get("MAILROOM_QUEUE_HANDLERS")
    if not isinstance(handlers, dict):
        errors.append(Error("MAILROOM_QUEUE_HANDLERS must map queue names to dotted paths.", id="messaging.E003"))
    else:
        for queue, path in handlers.items():
            try:
                import_string(path)
            except ImportError as exc:
                errors.append(Error(f"MAILROOM_QUEUE_HANDLERS[{queue!r}]: cannot import {path!r} ({exc}).",
                                    id="messaging.E004"))
    return errors


def reversible(name: str) -> bool:
    """Whether the project's URLconf has a URL named `name`."""
    try:
        reverse(name)
    except NoReverseMatch:
        return False
    return True


@register(Tags.urls)
def check_project_urls(app_configs=None, **kwargs) -> list[Warning]:
    """When the project serves Mailroom's pages, the URLs and context they need from the project are there."""
    if not getattr(settings, "ROOT_URLCONF", None) or not reversible("dashboard"):
        return []  # the pages are not included (Django's own URL checks report a broken URLconf)
    warnings = [
        Warning(f"Mailroom's pages link to the URL named {name!r}, which the project does not define; "
                "every page fails with NoReverseMatch.",
                hint="Include admin.site.urls and django.contrib.auth's login and logout views (see the README).",
                id="messaging.W001")
        for name in PROJECT_URL_NAMES if not reversible(name)
    ]
    engines = [engine for engine in settings.TEMPLATES
               if engine["BACKEND"] == "django.template.backends.django.DjangoTemplates"]
    if not any(CONTEXT_PROCESSOR in engine.get("OPTIONS", {}).get("context_processors", []) for engine in engines):
        warnings.append(Warning(f"{CONTEXT_PROCESSOR} is not in TEMPLATES' context_processors: "
                                "Mailroom's pages do not show the broker's memory or disk alarm.",
                                id="messaging.W002"))
    return warnings


def unmigrated(*, using: str = DEFAULT_DB_ALIAS) -> str:
    """Why the database `using` cannot hold Mailroom's records yet ('' when it can, or does not answer).

    A database that does not answer is left to the processes' retries; one that answers without
    Mailroom's tables (the `messaging` migrations, with their dependencies) will not get them by waiting.
    """
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(connections[using])
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes("messaging"))
    except DatabaseError:
        return ""
    if not plan:
        return ""
    names = [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]
    return (f"the database {using!r} lacks Mailroom's tables ({len(names)} migrations not applied: "
            f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); run `python manage.py migrate`")
