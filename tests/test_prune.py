"""Retention: `prune --older-than` in batches; a dry run deletes nothing."""
from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from messaging.audit.retention import parse_age
from messaging.models import Delivery, Message
from tests.audit_data import delivery, letter

pytestmark = pytest.mark.django_db


def prune(*args) -> str:
    out = StringIO()
    call_command("prune", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def history():
    old = timezone.now() - timedelta(days=40)
    letters = {
        "old": [letter(created_at=old + timedelta(seconds=i)) for i in range(7)],
        "old_failed": [letter(created_at=old, status=Message.Status.FAILED, published_at=None)],
        "old_pending": [letter(created_at=old, status=Message.Status.PENDING, published_at=None)],
        "new": [letter(created_at=timezone.now() - timedelta(days=2))],
    }
    for m in letters["old"] + letters["new"]:
        delivery(m)
        delivery(m, status=Delivery.Status.REQUEUED)
    copy = letter(republished_from=letters["old"][0])
    letters["copy"] = [copy]
    return letters


def test_dry_run_deletes_nothing_then_real_run_deletes_in_batches(history):
    before = (Message.objects.count(), Delivery.objects.count())
    out = prune("--older-than", "30d", "--dry-run")
    assert "Would delete 8 letter(s) and 14 delivery(ies)" in out
    assert (Message.objects.count(), Delivery.objects.count()) == before

    out = prune("--older-than", "30d", "--batch-size", "3")
    assert "Deleted 8 letter(s) and 14 delivery(ies)" in out and "in 3 batch(es)" in out
    remaining = set(Message.objects.values_list("message_id", flat=True))
    assert remaining == {m.message_id for k in ("old_pending", "new", "copy") for m in history[k]}
    assert Delivery.objects.count() == 2  # the new letter's
    copy = Message.objects.get(pk=history["copy"][0].pk)
    assert copy.republished_from_id is None  # the copy stays, its link to the pruned original goes


def test_status_filter_and_pending_only_by_name(history):
    assert "Deleted 1 letter(s)" in prune("--older-than", "30d", "--status", "failed")
    assert Message.objects.filter(status=Message.Status.PUBLISHED, created_at__lt=timezone.now() - timedelta(days=30)).count() == 7
    assert "Deleted 1 letter(s)" in prune("--older-than", "30d", "--status", "pending")
    assert not Message.objects.filter(status=Message.Status.PENDING).exists()


def test_ages_and_errors():
    assert parse_age("30d") == timedelta(days=30) and parse_age("12h") == timedelta(hours=12)
    assert parse_age("2w") == timedelta(weeks=2) and parse_age("90m") == timedelta(minutes=90)
    with pytest.raises(CommandError, match="not an age"):
        prune("--older-than", "30 days")
