"""Operations endpoints: `/healthz` for load balancers and `/metrics` for Prometheus.

`/metrics` reads the database (and the management API, when configured) at scrape time through a
custom collector: the web processes keep no counters of their own, so every process (and every
restart) reports the same figures. Access: with MAILROOM_METRICS_TOKEN set, a scraper sends
`Authorization: Bearer <token>`; without it, only logged-in staff may read it.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import time
from datetime import timedelta
from http import HTTPStatus

from django.core.cache import cache
from django.db import DatabaseError, connection
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from messaging import conf
from messaging.amqp import management
from messaging.amqp.connection import connect, describe
from messaging.models import Delivery, Message, Worker
from messaging.web.counting import capped_count

logger = logging.getLogger(__name__)

# The check's socket timeout (see `connect`): a broker that does not answer is unhealthy quickly.
HEALTH_BROKER_TIMEOUT = 2.0
# /healthz needs no login: its broker check (a new AMQP connection) is shared by the requests of a
# process for this long, so that a flood of them cannot churn the broker's connections.
HEALTH_BROKER_REUSE_SECONDS = 2.0
# Longer than a check can take (twice HEALTH_BROKER_TIMEOUT per address): a claim on the check
# that is older was lost with its request, and the next request checks instead.
HEALTH_BROKER_CHECK_SECONDS = 30.0


def check_database() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)
    except DatabaseError as exc:
        logger.warning("healthz database=unavailable error=%s", exc.__class__.__name__)
        return False


def check_broker() -> bool:
    """Whether the broker answers a login: one check at a time, its answer reused for
    `HEALTH_BROKER_REUSE_SECONDS` after it came and while the next check runs (a broker that drops
    packets takes up to twice `HEALTH_BROKER_TIMEOUT` per address to fail: requests do not queue
    behind it). Answer and claim live in Django's cache, which by default is the process's own."""
    # Keyed by a hash of RABBITMQ_URL: an answer is about one broker, and the key holds no password.
    key = "mailroom:healthz:broker:" + hashlib.sha256(conf.get("RABBITMQ_URL").encode()).hexdigest()
    deadline = time.monotonic() + HEALTH_BROKER_CHECK_SECONDS
    while not cache.add(f"{key}:claimed", True, timeout=HEALTH_BROKER_CHECK_SECONDS):
        answered = cache.get(key)
        if answered is not None or time.monotonic() > deadline:
            return bool(answered)  # checked a moment ago or being checked now: the last answer
        time.sleep(0.05)  # the first check is under way: its answer, or the claim, comes soon
    answered = _broker_answers()
    cache.set(key, answered, timeout=None)
    cache.set(f"{key}:claimed", True, timeout=HEALTH_BROKER_REUSE_SECONDS)  # the moment counts from the answer
    return answered


def _broker_answers() -> bool:
    try:
        connect(timeout=HEALTH_BROKER_TIMEOUT, client_name="mailroom-healthz").close()
        return True
    except Exception as exc:  # noqa: BLE001 — any failure means "not healthy"; the reason goes to the log
        logger.warning("healthz broker=unavailable error=%s", describe(exc))
        return False


@never_cache
@require_GET
def healthz(request):
    """`{"database": "ok"|"unavailable", "broker": ...}`: 200 when both answer, 503 otherwise."""
    checks = {"database": check_database(), "broker": check_broker()}
    body = {name: "ok" if ok else "unavailable" for name, ok in checks.items()}
    return JsonResponse(body, status=HTTPStatus.OK if all(checks.values()) else HTTPStatus.SERVICE_UNAVAILABLE)


class MailroomCollector:
    """Reads Mailroom's figures when Prometheus scrapes (bounded queries; see messaging.web.counting)."""

    def collect(self):
        for name, noun, model in (("mailroom_letters", "Letters", Message), ("mailroom_deliveries", "Deliveries", Delivery)):
            by_status = GaugeMetricFamily(
                name, f"{noun} by status (exact up to 10,000, the planner's estimate beyond).", labels=["status"])
            for value, _ in model.Status.choices:
                by_status.add_metric([value], capped_count(model.objects.filter(status=value)).value)
            yield by_status

        since = timezone.now() - timedelta(minutes=5)
        recent = GaugeMetricFamily("mailroom_letters_published_last_5m", "Letters published in the last 5 minutes.")
        recent.add_metric([], Message.objects.filter(published_at__gte=since).count())
        yield recent

        heartbeat = GaugeMetricFamily(
            "mailroom_worker_heartbeat_timestamp_seconds", "Last heartbeat of each running worker (Unix time).",
            labels=["host", "pid"])
        alive = 0
        cutoff = timezone.now() - timedelta(seconds=60)
        for w in Worker.objects.filter(status=Worker.Status.RUNNING).order_by("-heartbeat_at")[:100]:
            heartbeat.add_metric([w.host, str(w.pid)], w.heartbeat_at.timestamp())
            alive += w.heartbeat_at >= cutoff
        yield heartbeat
        workers = GaugeMetricFamily("mailroom_workers_alive", "Running workers with a heartbeat in the last minute.")
        workers.add_metric([], alive)
        yield workers

        if management.configured():
            queues = management.queues()
            up = GaugeMetricFamily("mailroom_management_api_up", "1 when the RabbitMQ management API answered.")
            up.add_metric([], 0 if queues is None else 1)
            yield up
            ready = GaugeMetricFamily("mailroom_queue_messages_ready", "Messages ready per queue.", labels=["queue"])
            unacked = GaugeMetricFamily("mailroom_queue_messages_unacked", "Messages delivered, not yet acked, per queue.",
                                        labels=["queue"])
            consumers = GaugeMetricFamily("mailroom_queue_consumers", "Consumers per queue.", labels=["queue"])
            for q in queues or []:
                name = q.get("name", "")
                ready.add_metric([name], q.get("messages_ready") or 0)
                unacked.add_metric([name], q.get("messages_unacknowledged") or 0)
                consumers.add_metric([name], q.get("consumers") or 0)
            yield ready
            yield unacked
            yield consumers


def metrics_allowed(request) -> bool:
    token = conf.get("MAILROOM_METRICS_TOKEN")
    if token:
        header = request.headers.get("Authorization", "")
        return header.startswith("Bearer ") and secrets.compare_digest(header[7:].encode(), token.encode())
    return request.user.is_authenticated and request.user.is_staff


@never_cache
@require_GET
def metrics(request):
    if not metrics_allowed(request):
        return HttpResponse("Forbidden: send the metrics token (MAILROOM_METRICS_TOKEN) or log in as staff.\n",
                            status=HTTPStatus.FORBIDDEN, content_type="text/plain")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MailroomCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
