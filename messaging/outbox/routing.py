"""Routing preview: which queues a message would reach now, from the management API's bindings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from messaging.amqp import management


@dataclass(frozen=True, kw_only=True)
class RoutePreview:
    """Where a message would go, from the broker's bindings: the queues it reaches, or why none."""

    known: bool  # False when the management API is not configured or does not answer
    queues: tuple[str, ...] = ()
    note: str = ""

    @property
    def text(self) -> str:
        if not self.known:
            return self.note or "Routing preview unavailable (RABBITMQ_MANAGEMENT_URL is not set or does not answer)."
        if self.queues:
            return "reaches queues " + ", ".join(self.queues) + (f" ({self.note})" if self.note else "")
        return self.note or "no queue is bound: it would be returned"


def preview_route(*, exchange: str, routing_key: str, headers: dict[str, Any], declare: bool = False) -> RoutePreview:
    """Which queues a message would reach now, computed from the management API's bindings."""
    if not management.configured():
        return RoutePreview(known=False)
    if not exchange:
        queues = management.queues()
        if queues is None:
            return RoutePreview(known=False)
        if any(q.get("name") == routing_key for q in queues):
            return RoutePreview(known=True, queues=(routing_key,))
        if declare:
            return RoutePreview(known=True, queues=(routing_key,), note="the queue will be declared")
        return RoutePreview(known=True, note="no queue is bound: it would be returned (no such queue)")
    exchanges, bindings = management.exchanges(), management.bindings()
    if exchanges is None or bindings is None:
        return RoutePreview(known=False)
    types = {e.get("name"): e.get("type") for e in exchanges}
    if exchange not in types:
        if declare:
            return RoutePreview(known=True, note="the exchange will be declared; no queue is bound: it would be returned")
        return RoutePreview(known=True, note=f"no exchange named {exchange!r}: the letter would fail (404)")
    reached: set[str] = set()
    _route(exchange, routing_key, headers, types, bindings, reached, seen=set())
    return RoutePreview(known=True, queues=tuple(sorted(reached)))


def _route(exchange, routing_key, headers, types, bindings, reached, *, seen) -> None:
    if exchange in seen:
        return
    seen.add(exchange)
    kind = types.get(exchange, "direct")
    for binding in bindings:
        if binding.get("source") != exchange or not _matches(kind, binding, routing_key, headers):
            continue
        if binding.get("destination_type") == "queue":
            reached.add(binding.get("destination"))
        else:  # exchange-to-exchange binding
            _route(binding.get("destination"), routing_key, headers, types, bindings, reached, seen=seen)


def _matches(kind: str, binding: dict, routing_key: str, headers: dict[str, Any]) -> bool:
    key = binding.get("routing_key", "")
    if kind == "fanout":
        return True
    if kind == "topic":
        return topic_matches(key, routing_key)
    if kind == "headers":
        args = dict(binding.get("arguments") or {})
        mode = str(args.pop("x-match", "all"))
        with_x = mode.endswith("-with-x")
        wanted = {k: v for k, v in args.items() if with_x or not k.startswith("x-")}
        hits = [k in headers and headers[k] == v for k, v in wanted.items()]
        return any(hits) if mode.startswith("any") else all(hits)
    return key == routing_key  # direct (and x-* plugin types, approximately)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: '*' is exactly one word, '#' zero or more.

    One pass over the key per word of the pattern (the set of key positions reachable so far): a
    backtracking match took exponential time for a binding like `#.#.#.#.#.z` and a long key.
    """
    words = routing_key.split(".") if routing_key else []
    reachable = {0}  # how many words of the key the pattern's words so far can have consumed
    for p in pattern.split(".") if pattern else []:
        if p == "#":
            reachable = set(range(min(reachable), len(words) + 1))
        else:
            reachable = {i + 1 for i in reachable if i < len(words) and (p == "*" or p == words[i])}
        if not reachable:
            return False
    return len(words) in reachable
