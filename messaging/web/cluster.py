"""The RabbitMQ cluster as its management API tells it: the nodes, their alarms, partitions, a node down.

Asked at most once every few seconds (cached): the banner of every page, the nodes on `/queues/`
and the dashboard. Every value comes from the broker, so it is kept as text and escaped by the
templates; a malformed answer shows as "unknown", never as an error.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from django.core.cache import cache

from messaging import conf
from messaging.amqp import management

# Every page shows the cluster's problems: the management API is asked at most this often (per cache).
NODES_CACHE_SECONDS = 5.0


@dataclass(frozen=True, kw_only=True)
class NodeRow:
    """One node of the cluster, as `/api/nodes` shows it."""

    name: str
    running: bool
    mem_alarm: bool
    disk_alarm: bool
    partitions: tuple[str, ...]  # the nodes this one cannot reach
    uptime: str  # e.g. "3 d 4 h"; "" when unknown (a node down)

    @property
    def troubles(self) -> list[str]:
        """Down, or cut off from other nodes: the cluster runs on without it, or split."""
        found = [] if self.running else [f"node {self.name} is down"]
        if self.partitions:
            found.append(f"network partition: {self.name} cannot reach {', '.join(self.partitions)}")
        return found

    @property
    def alarms(self) -> list[str]:
        """Its resource alarms: they block every publisher of the cluster."""
        return ([f"memory alarm on {self.name}"] if self.mem_alarm else []) + (
            [f"disk alarm on {self.name}"] if self.disk_alarm else [])


def uptime_text(milliseconds) -> str:
    """A node's uptime (milliseconds) in words, to the two largest units; "" when not a number."""
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int | float) or milliseconds < 0:
        return ""
    seconds = int(milliseconds // 1000)
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min" if minutes else f"{seconds} s"


def node_row(node: dict) -> NodeRow:
    """A node from one item of `/api/nodes`."""
    partitions = node.get("partitions")
    return NodeRow(
        name=str(node.get("name", "?")), running=node.get("running") is True, mem_alarm=bool(node.get("mem_alarm")),
        disk_alarm=bool(node.get("disk_free_alarm")),
        partitions=tuple(str(p) for p in partitions) if isinstance(partitions, list) else (),
        uptime=uptime_text(node.get("uptime")) if node.get("running") is True else "",
    )


def nodes() -> list[NodeRow] | None:
    """The cluster's nodes by name (cached a few seconds); None when unknown (no management API, no answer)."""
    if not management.configured():
        return None
    # Keyed by a hash of the API's URL: the nodes are one cluster's, and the key holds no password.
    key = "mailroom:nodes:" + hashlib.sha256(conf.get("RABBITMQ_MANAGEMENT_URL").encode()).hexdigest()
    cached = cache.get(key)  # a 1-tuple, since None (unknown) is an answer worth keeping too
    if cached is not None:
        return cached[0]
    found = management.nodes()
    rows = None if found is None else sorted((node_row(n) for n in found), key=lambda n: n.name)
    cache.set(key, (rows,), timeout=NODES_CACHE_SECONDS)
    return rows


def alarms(rows: list[NodeRow]) -> list[str]:
    """The resource alarms in effect on any node."""
    return [alarm for n in rows for alarm in n.alarms]


def troubles(rows: list[NodeRow]) -> list[str]:
    """Nodes down and network partitions."""
    return [trouble for n in rows for trouble in n.troubles]
