"""The RabbitMQ management HTTP API (RABBITMQ_MANAGEMENT_URL): queues, exchanges, bindings, nodes, alarms.

Short timeouts. The listings return None when the API is not configured or does not answer, so
pages degrade instead of failing; a single queue's reads raise `ManagementUnavailable` instead, so
that "no such queue" (None) and "cannot tell" differ. The only write is `get_requeued`, which takes
messages and puts them back.
"""
from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from messaging import conf
from messaging.errors import ManagementRefused, ManagementUnavailable

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 2.0
PEEK_TIMEOUT_SECONDS = 5.0  # a get takes the messages and puts them back: more work than a listing


def configured() -> bool:
    return bool(conf.get("RABBITMQ_MANAGEMENT_URL"))


def get(path: str) -> Any | None:
    """GET `/api/<path>` as JSON; None when not configured or on any error (logged, password-free)."""
    try:
        return call(path)
    except (ManagementUnavailable, ManagementRefused):
        return None


def call(path: str, *, payload: dict | None = None, timeout: float = TIMEOUT_SECONDS) -> Any | None:
    """GET (or POST `payload` to) `/api/<path>`: its JSON, None for a 404 (no such queue); raises
    `ManagementUnavailable` when the API is not configured or does not answer, `ManagementRefused` on a 400."""
    if not configured():
        raise ManagementUnavailable("The RabbitMQ management API is not configured (RABBITMQ_MANAGEMENT_URL).")
    split = urlsplit(conf.get("RABBITMQ_MANAGEMENT_URL"))
    host = split.hostname or "localhost"
    if split.port:
        host = f"{host}:{split.port}"
    base = urlunsplit((split.scheme, host, split.path.rstrip("/"), "", ""))
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{base}/api/{path.lstrip('/')}", data=data,
                                     method="GET" if data is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if split.username:
        token = base64.b64encode(f"{unquote(split.username)}:{unquote(split.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 — operator-set URL
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        if exc.code == 400:  # e.g. "basic.get not supported by stream queues"
            raise ManagementRefused(f"RabbitMQ refused: {_reason(exc)}") from None
        logger.warning("management API %s answered %s", path, exc.code)
        raise ManagementUnavailable(f"The RabbitMQ management API answered {exc.code} {exc.reason}.") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.warning("management API %s unavailable: %s", path, exc.__class__.__name__)
        raise ManagementUnavailable("The RabbitMQ management API did not answer.") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    """The `reason` of the API's error answer, one line, bounded."""
    try:
        reason = json.loads(exc.read(4096) or b"{}").get("reason")
    except (ValueError, AttributeError, OSError):
        reason = None
    return " ".join(str(reason or exc.reason).split())[:300]


def vhost() -> str:
    """The vhost of RABBITMQ_URL's first address, URL-quoted for the API."""
    path = urlsplit(conf.get("RABBITMQ_URL").split(",")[0]).path
    name = urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"
    return quote(name, safe="")


def queues() -> list[dict] | None:
    return get(f"queues/{vhost()}")


def queue(name: str) -> dict | None:
    """One queue's details; None when there is no such queue (raises `ManagementUnavailable`)."""
    return call(f"queues/{vhost()}/{quote(name, safe='')}")


def get_requeued(name: str, *, count: int, truncate: int) -> list[dict] | None:
    """Up to `count` messages from the head of queue `name`, each put back at once (`ack_requeue_true`:
    RabbitMQ marks them redelivered, and a quorum queue counts the delivery); bodies cut to `truncate`
    bytes. None when there is no such queue (raises `ManagementUnavailable`)."""
    return call(f"queues/{vhost()}/{quote(name, safe='')}/get",
                payload={"count": count, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": truncate},
                timeout=PEEK_TIMEOUT_SECONDS)


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
