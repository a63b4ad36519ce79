"""Letters and deliveries made directly in the database, for the audit tests (no broker involved)."""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import Delivery, Message

HOSTILE = "<script>alert('x')</script>"


def letter(**fields) -> Message:
    fields.setdefault("message_id", f"m-{uuid.uuid4().hex}")
    fields.setdefault("routing_key", "audit-q")
    fields.setdefault("status", Message.Status.PUBLISHED)
    fields.setdefault("published_at", timezone.now())
    body = fields.pop("body", b"hello")
    message = Message(**fields)
    message.set_body(body)
    message.save()
    return message


def delivery(message: Message, **fields) -> Delivery:
    fields.setdefault("queue", message.routing_key or "audit-q")
    fields.setdefault("delivery_tag", 1)
    fields.setdefault("status", Delivery.Status.ACKED)
    fields.setdefault("received_at", timezone.now())
    fields.setdefault("settled_at", fields["received_at"])
    return Delivery.objects.create(message=message, **fields)


def seed(n: int, *, queues: tuple[str, ...] = ("seed-a", "seed-b"), start=None) -> None:
    """`n` letters a minute apart (newest now), each delivered once per queue; a few failures."""
    start = start or timezone.now() - timedelta(minutes=n)
    letters = []
    for i in range(n):
        at = start + timedelta(minutes=i)
        status = Message.Status.FAILED if i % 50 == 7 else Message.Status.PUBLISHED
        m = Message(message_id=f"seed-{uuid.uuid4().hex}", routing_key=queues[i % len(queues)], status=status,
                    origin=Message.Origin.API if i % 3 else Message.Origin.FORM, created_at=at,
                    published_at=at if status == Message.Status.PUBLISHED else None,
                    exchange="" if i % 4 else "audit.x", correlation_id=f"c-{i}", headers={"i": i})
        m.set_body(f"letter {i}".encode())
        letters.append(m)
    Message.objects.bulk_create(letters, batch_size=1000)
    pks = dict(Message.objects.filter(message_id__startswith="seed-").values_list("message_id", "pk"))
    rows = []
    for i, m in enumerate(letters):
        if m.status != Message.Status.PUBLISHED:
            continue
        for q in queues:
            status = Delivery.Status.REJECTED if i % 97 == 3 else Delivery.Status.ACKED
            rows.append(Delivery(message_id=pks[m.message_id], queue=q, delivery_tag=i + 1, status=status,
                                 received_at=m.created_at + timedelta(seconds=1),
                                 settled_at=m.created_at + timedelta(seconds=2)))
    Delivery.objects.bulk_create(rows, batch_size=1000)


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    """Users log in with force_login or a cheap hash: PBKDF2 costs a second per user on CI."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
