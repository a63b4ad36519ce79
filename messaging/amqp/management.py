"""The RabbitMQ management HTTP API (RABBITMQ_MANAGEMENT_URL): queues, exchanges, bindings, nodes, alarms.

Read-only, short timeouts, and every function returns None when the API is not configured or does
not answer, so pages degrade instead of failing.
"""
from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from messaging import conf

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 2.0


def configured() -> bool:
    return bool(conf.get("RABBITMQ_MANAGEMENT_URL"))


def get(path: str) -> Any | None:
    """GET `/api/<path>` as JSON; None when not configured or on any error (logged, password-free)."""
    if not configured():
        return None
    split = urlsplit(conf.get("RABBITMQ_MANAGEMENT_URL"))
    host = split.hostname or "localhost"
    if split.port:
        host = f"{host}:{split.port}"
    base = urlunsplit((split.scheme, host, split.path.rstrip("/"), "", ""))
    request = urllib.request.Request(f"{base}/api/{path.lstrip('/')}")
    if split.username:
        token = base64.b64encode(f"{split.username}:{split.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310 — operator-set URL
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.warning("management API %s unavailable: %s", path, exc.__class__.__name__)
        return None


def vhost() -> str:
    """The vhost of RABBITMQ_URL's first address, URL-quoted for the API."""
    path = urlsplit(conf.get("RABBITMQ_URL").split(",")[0]).path
    name = urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"
    return quote(name, safe="")


def queues() -> list[dict] | None:
    return get(f"queues/{vhost()}")


def exchanges() -> list[dict] | None:
    return get(f"exchanges/{vhost()}")


def bindings() -> list[dict] | None:
    return get(f"bindings/{vhost()}")


def nodes() -> list[dict] | None:
    """The cluster's nodes (`/api/nodes`), one dict each; None when unknown."""
    found = get("nodes")
    if not isinstance(found, list):
        return None
    return [node for node in found if isinstance(node, dict)]


def alarms() -> list[str] | None:
    """Names of the resource alarms in effect (memory, disk) on any node; None when unknown."""
    found = nodes()
    if found is None:
        return None
    return node_alarms(found)


def node_alarms(found: list[dict]) -> list[str]:
    """The resource alarms in effect on `found` nodes (from `nodes()`)."""
    alarms = []
    for node in found:
        if node.get("mem_alarm"):
            alarms.append(f"memory alarm on {node.get('name')}")
        if node.get("disk_free_alarm"):
            alarms.append(f"disk alarm on {node.get('name')}")
    return alarms
