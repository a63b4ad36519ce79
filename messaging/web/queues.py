"""The broker view (`/queues/`): queues, exchanges and bindings, the cluster's nodes and the alarms in
effect; one queue's details and a peek at its head (`/queues/<name>/`).

From the management HTTP API when RABBITMQ_MANAGEMENT_URL is set (depths, consumers, rates,
bindings, the node of each queue or the leader of a quorum queue, nodes, alarms); without it, from passive declares of the queues known from the history
(ready and consumer counts only).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from django import forms
from django.contrib.auth.decorators import login_required, permission_required
from django.db import connection
from django.shortcuts import render

from messaging.amqp import management, peeking
from messaging.amqp.connection import describe, queue_states
from messaging.errors import ManagementRefused, ManagementUnavailable
from messaging.models import Delivery, Worker
from messaging.web import cluster
from messaging.web.display import pretty_json, shown_copy

logger = logging.getLogger(__name__)

# Passive declares cost one connection each: look at this many known queues at most.
MAX_PASSIVE_QUEUES = 30


@dataclass(frozen=True, kw_only=True)
class QueueRow:
    name: str
    ready: int | None
    unacked: int | None = None
    consumers: int | None = None
    publish_rate: float | None = None
    deliver_rate: float | None = None
    ack_rate: float | None = None
    kind: str = ""
    state: str = ""
    missing: bool = False
    node: str = ""  # the node it is on; a quorum queue's (or stream's) leader
    members: int | None = None  # a replicated queue's replicas, and how many of them are online
    online: int | None = None

    @property
    def depth(self) -> int:
        return (self.ready or 0) + (self.unacked or 0)


@dataclass(frozen=True, kw_only=True)
class ExchangeRow:
    name: str
    kind: str
    durable: bool
    bindings: list[dict] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class BrokerView:
    source: str  # "management" or "passive"
    queues: list[QueueRow]
    exchanges: list[ExchangeRow] | None = None  # None: unknown without the management API
    alarms: list[str] | None = None  # None: unknown
    nodes: list[cluster.NodeRow] | None = None  # None: unknown
    error: str = ""

    def deepest(self, n: int = 5) -> list[QueueRow]:
        return sorted(self.queues, key=lambda q: -q.depth)[:n]

    @property
    def node_leads(self) -> list[tuple[cluster.NodeRow, int]]:
        """Each node, and how many of the replicated queues shown it leads."""
        leads = Counter(q.node for q in self.queues if q.members is not None)
        return [(node, leads[node.name]) for node in self.nodes or []]


def known_queues(*, limit: int = MAX_PASSIVE_QUEUES) -> list[str]:
    """Queues named in the history (deliveries) and by the workers, without scanning the table."""
    table = Delivery._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # A loose index scan over (queue, received_at): one index probe per distinct queue.
            cursor.execute(f"""
                WITH RECURSIVE q AS (
                    (SELECT queue FROM {table} ORDER BY queue LIMIT 1)
                    UNION ALL
                    SELECT (SELECT d.queue FROM {table} d WHERE d.queue > q.queue ORDER BY d.queue LIMIT 1)
                    FROM q WHERE q.queue IS NOT NULL
                ) SELECT queue FROM q WHERE queue IS NOT NULL LIMIT %s""", [limit])
        else:
            cursor.execute(f"SELECT DISTINCT queue FROM {table} ORDER BY queue LIMIT %s", [limit])
        names = {row[0] for row in cursor.fetchall()}
    for queues in Worker.objects.filter(status=Worker.Status.RUNNING).values_list("queues", flat=True)[:100]:
        names.update(q for q in queues or [] if isinstance(q, str))
    return sorted(names)[:limit]


def _rate(queue: dict, key: str) -> float | None:
    details = (queue.get("message_stats") or {}).get(f"{key}_details")
    return details.get("rate") if details else None


def _count(value) -> int | None:
    return len(value) if isinstance(value, list) else None


def from_management() -> BrokerView | None:
    queues = management.queues()
    if queues is None:
        return None
    rows = [
        QueueRow(
            name=q.get("name", ""), ready=q.get("messages_ready"), unacked=q.get("messages_unacknowledged"),
            consumers=q.get("consumers"), publish_rate=_rate(q, "publish"), deliver_rate=_rate(q, "deliver_get"),
            ack_rate=_rate(q, "ack"), kind=q.get("type", ""), state=q.get("state", ""),
            node=str(q.get("leader") or q.get("node") or ""), members=_count(q.get("members")),
            online=_count(q.get("online")),
        )
        for q in queues
    ]
    bindings: dict[str, list[dict]] = {}
    for b in management.bindings() or []:
        bindings.setdefault(b.get("source", ""), []).append({
            "destination": b.get("destination", ""), "destination_type": b.get("destination_type", ""),
            "routing_key": b.get("routing_key", ""), "arguments": b.get("arguments") or {},
        })
    exchanges = [
        ExchangeRow(name=e.get("name", ""), kind=e.get("type", ""), durable=bool(e.get("durable")),
                    bindings=bindings.get(e.get("name", ""), []))
        for e in management.exchanges() or []
    ]
    nodes = cluster.nodes()
    return BrokerView(source="management", queues=sorted(rows, key=lambda r: r.name), exchanges=exchanges,
                      alarms=None if nodes is None else cluster.alarms(nodes), nodes=nodes)


def from_passive_declares(*, limit: int = MAX_PASSIVE_QUEUES) -> BrokerView:
    rows, error = [], ""
    names = list(known_queues(limit=limit))
    try:
        states = queue_states(names, timeout=2) if names else {}
    except Exception as exc:  # noqa: BLE001 — the page shows the broker as unreachable instead of failing
        error = describe(exc)
        logger.warning("queue view: broker unavailable: %s", error)
        states = {}
    for name, state in states.items():
        rows.append(QueueRow(name=name, ready=state.message_count, consumers=state.consumer_count) if state
                    else QueueRow(name=name, ready=None, missing=True))
    return BrokerView(source="passive", queues=rows, error=error)


def broker_view(*, limit: int = MAX_PASSIVE_QUEUES) -> BrokerView:
    """The broker as the management API shows it, or as passive declares can tell."""
    if management.configured():
        view = from_management()
        if view is not None:
            return view
        fallback = from_passive_declares(limit=limit)
        return BrokerView(source="passive", queues=fallback.queues,
                          error=fallback.error or "the management API did not answer; showing passive declares")
    return from_passive_declares(limit=limit)


@login_required
@permission_required("messaging.view_message", raise_exception=True)
def queues(request):
    return render(request, "messaging/queues.html", {"view": broker_view()})


class PeekForm(forms.Form):
    count = forms.IntegerField(min_value=1, max_value=peeking.MAX_PEEK, initial=10, label="Messages",
                               help_text=f"From the head of the queue, at most {peeking.MAX_PEEK}.")


@login_required
@permission_required("messaging.view_message", raise_exception=True)  # a peek shows bodies, as letters do
def queue_detail(request, queue: str):
    """A queue's details from the management API; POST: peek at the messages at its head."""
    form = PeekForm(request.POST if request.method == "POST" else None)
    context = {"queue": queue, "form": form, "notice": peeking.NOTICE, "details": None, "peeked": None, "error": ""}
    status = 200
    try:
        details = management.queue(queue)
        if details is None:
            context["error"], status = "There is no queue with this name.", 404
        else:
            context["details"] = details
            context["arguments"] = pretty_json(details.get("arguments") or {})
            if form.is_bound and form.is_valid():
                copies = peeking.peek(queue, count=form.cleaned_data["count"]) or []
                context["peeked"] = [shown_copy(c) for c in copies]
            elif form.is_bound:
                status = 400
    except ManagementUnavailable as exc:
        context["error"], status = f"{exc} A queue's details and peeking need it.", 503
    except ManagementRefused as exc:  # a stream queue: no basic.get
        context["error"], status = str(exc), 409
    return render(request, "messaging/queue_detail.html", context, status=status)
