"""Reconciliation: a letter published to a queue nobody reads is found; a lost one fails the check."""
from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from messaging.models import Message
from messaging.outbox.publishing import create_message
from tests.audit_data import delivery, fast_passwords, letter  # noqa: F401 — autouse

pytestmark = pytest.mark.django_db


def reconcile(*args) -> str:
    out = StringIO()
    call_command("reconcile", *args, stdout=out)
    return out.getvalue()


def test_a_letter_nobody_consumes_is_detected_then_a_lost_one_fails(queue_name, amqp, admin_client,
                                                                    django_capture_on_commit_callbacks):
    amqp.queue_declare(queue=queue_name, durable=True)
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        m = create_message(routing_key=queue_name, body=b"nobody reads me")
    m.refresh_from_db()
    assert m.status == Message.Status.PUBLISHED
    delivered = letter(routing_key=queue_name)
    delivery(delivered)
    Message.objects.filter(pk__in=[m.pk, delivered.pk]).update(published_at=timezone.now() - timedelta(minutes=10))

    output = reconcile("--minutes", "5")
    assert m.message_id in output and delivered.message_id not in output
    assert f"queue '{queue_name}': Mailroom 1 undelivered, broker 1 ready, 0 consumer(s): ok" in output
    assert "no consumer reads" in output
    # The dashboard lists it too.
    assert m.message_id in admin_client.get(reverse("dashboard")).content.decode()
    # With a longer grace period it is not due yet.
    assert m.message_id not in reconcile("--minutes", "15")

    amqp.queue_purge(queue_name)  # the broker lost it
    with pytest.raises(CommandError, match="fewer messages"):
        reconcile("--minutes", "5")


def test_a_queue_that_does_not_exist_is_a_mismatch(queue_name):
    m = letter(routing_key=queue_name, published_at=timezone.now() - timedelta(minutes=30))
    out = StringIO()
    with pytest.raises(CommandError):
        call_command("reconcile", stdout=out)
    assert m.message_id in out.getvalue() and "broker missing" in out.getvalue()
