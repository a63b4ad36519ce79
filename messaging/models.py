"""The post office's records: letters (`Message`), their receipts (`Delivery`) and workers."""
from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import connections, models, router, transaction
from django.db.models import Value
from django.utils import timezone

from messaging.search import search_index_for


def new_message_id() -> str:
    return str(uuid.uuid4())


class MessageQuerySet(models.QuerySet):
    def pending(self) -> MessageQuerySet:
        return self.filter(status=Message.Status.PENDING)

    def due(self, *, now=None) -> MessageQuerySet:
        """Pending letters whose next publish attempt is due (for the relay)."""
        now = now or timezone.now()
        return self.pending().filter(next_attempt_at__lte=now)


class Message(models.Model):
    """One letter: what was (or is to be) published, and the outcome of publishing it."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        PUBLISHED = "published", "published"
        UNROUTABLE = "unroutable", "unroutable"
        FAILED = "failed", "failed"
        EXTERNAL = "external", "external (published outside Mailroom)"

    class Origin(models.TextChoices):
        FORM = "form", "publish form"
        API = "api", "HTTP API"
        COMMAND = "command", "manage.py publish"
        REPUBLISH = "republish", "republish"
        REPLAY = "replay", "replay from a dead-letter queue"
        EXTERNAL = "external", "another producer"

    message_id = models.CharField(
        max_length=255, default=new_message_id,
        help_text="The AMQP message_id property; a UUID when the producer gave none.",
    )
    raw_message_id = models.BinaryField(
        null=True, blank=True, editable=False,
        help_text="The producer's message_id as it came, kept when it could not be stored as text exactly (not "
                  "UTF-8, a NUL, too long): message_id then ends with ~sha256: and these bytes' digest.",
    )
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.FORM)
    exchange = models.CharField(max_length=255, blank=True, help_text="'' is the default exchange.")
    exchange_type = models.CharField(
        max_length=16, blank=True,
        help_text="Type to declare the exchange with when `declare` is set ('' for the default exchange).",
    )
    routing_key = models.CharField(max_length=255, blank=True)
    declare = models.BooleanField(
        default=False,
        help_text="Declare the queue or exchange before publishing if it is missing (durable when MAILROOM_DURABLE is true).",
    )
    body = models.BinaryField(help_text="The exact bytes of the body.")
    body_size = models.PositiveBigIntegerField(default=0)
    body_sha256 = models.CharField(max_length=64, blank=True)
    content_type = models.CharField(max_length=255, blank=True)
    content_encoding = models.CharField(max_length=255, blank=True)
    correlation_id = models.CharField(max_length=255, blank=True)
    delivery_mode = models.PositiveSmallIntegerField(default=2, help_text="2 = persistent, 1 = transient.")
    headers = models.JSONField(default=dict, blank=True, help_text="AMQP headers, as JSON-safe values.")
    properties = models.JSONField(
        default=dict, blank=True,
        help_text="The other AMQP properties: priority, reply_to, expiration, timestamp, type, user_id, app_id.",
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    last_error = models.TextField(blank=True, help_text="Why the last publish attempt did not succeed.")
    attempts = models.PositiveIntegerField(default=0, help_text="Publish attempts so far.")
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="When the relay tries again.")
    # These four are often empty (a letter from another producer has no publisher; few letters are
    # republished or replies): their indexes, in Meta, hold only the rows that have a value, which such writes skip.
    published_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_index=False,
    )
    republished_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="republications",
        help_text="The letter this one is a copy of.", db_index=False,
    )
    in_reply_to = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replies", db_index=False,
        help_text="The request this letter answers: a letter Mailroom published with reply_to and this correlation_id.",
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    published_at = models.DateTimeField(null=True, blank=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        # Every index slows the consumer's inserts: keep the ones the pages and the relay need.
        # Unique and plain indexes declared here rather than with unique=/db_index= on the fields:
        # PostgreSQL then gets no extra LIKE (varchar_pattern_ops) index per text column.
        constraints = [models.UniqueConstraint(fields=["message_id"], name="message_message_id_unique")]
        indexes = [
            # By routing key, newest first: search, and "letters sent straight to queue X".
            models.Index(fields=["routing_key", "created_at"], name="message_routing_created_idx"),
            models.Index(fields=["correlation_id"], name="message_correlation_id_idx"),
            models.Index(fields=["next_attempt_at"], name="message_relay_idx", condition=models.Q(status="pending")),
            models.Index(fields=["status", "created_at"], name="message_status_created_idx"),
            # The admin's filters by origin and exchange, newest first, at a million letters.
            models.Index(fields=["origin", "created_at"], name="message_origin_created_idx"),
            models.Index(fields=["exchange", "created_at"], name="message_exchange_created_idx"),
            # Partial: `col = x`, `col >= x` and the foreign keys' checks all imply NOT NULL.
            models.Index(fields=["published_at"], name="message_published_at_idx",
                         condition=models.Q(published_at__isnull=False)),
            models.Index(fields=["published_by"], name="message_published_by_idx",
                         condition=models.Q(published_by__isnull=False)),
            models.Index(fields=["republished_from"], name="message_republished_from_idx",
                         condition=models.Q(republished_from__isnull=False)),
            models.Index(fields=["in_reply_to"], name="message_in_reply_to_idx",
                         condition=models.Q(in_reply_to__isnull=False)),
        ]

    def __str__(self) -> str:
        return self.message_id

    def save(self, *args, **kwargs) -> None:
        update_fields = kwargs.get("update_fields")
        if update_fields is None or "body" in update_fields:
            self.set_body(bytes(self.body or b""))
        # A new letter's words are indexed with it (by the database itself on PostgreSQL); a letter's body
        # and headers never change afterwards.
        using = kwargs.get("using") or router.db_for_write(Message, instance=self)
        index = search_index_for(connections[using].vendor)
        documents = index.documents([(None, self.body, self.headers)]) if self._state.adding else {}
        if not documents:
            super().save(*args, **kwargs)
            return
        with transaction.atomic(using=using, savepoint=False):
            super().save(*args, **kwargs)
            index.add({self.pk: documents[None]}, using=using)

    def set_body(self, body: bytes) -> None:
        """Store `body` with its size and sha256 (kept for display and integrity checks)."""
        self.body = body
        self.body_size = len(body)
        self.body_sha256 = hashlib.sha256(body).hexdigest()

    @property
    def destination(self) -> str:
        return f"exchange {self.exchange!r}, key {self.routing_key!r}" if self.exchange else f"queue {self.routing_key!r}"


class DeliveryQuerySet(models.QuerySet):
    def settled(self) -> DeliveryQuerySet:
        return self.exclude(status=Delivery.Status.RECEIVED)

    def anomalous(self) -> DeliveryQuerySet:
        """Deliveries marked: another body under the letter's message_id, or a queue it was never routed to."""
        return self.exclude(anomaly=Delivery.Anomaly.NONE)

    def trusted(self) -> DeliveryQuerySet:
        """Deliveries that are the letter's own: its body, on a route its publish took."""
        return self.filter(anomaly=Delivery.Anomaly.NONE)

    def consumed(self) -> DeliveryQuerySet:
        """Deliveries to a queue's consumers: not a stream tap's readings (a tap takes nothing from anyone)."""
        return self.exclude(queue__in=StreamOffset.objects.values("stream"))

    def newest_first(self) -> DeliveryQuerySet:
        """The order in which a letter's latest deliveries are taken (its pages show the latest only)."""
        return self.order_by("-received_at", "-id")


class Delivery(models.Model):
    """One receipt of a letter by a consumer, and how it was settled (ack, requeue, reject)."""

    class Status(models.TextChoices):
        RECEIVED = "received", "received (not yet settled)"
        ACKED = "acked", "acked"
        REQUEUED = "requeued", "requeued"
        REJECTED = "rejected", "rejected"

    class DeathReason(models.TextChoices):
        NONE = "", "not dead-lettered"
        REJECTED = "rejected", "rejected"
        EXPIRED = "expired", "expired (TTL)"
        MAXLEN = "maxlen", "queue length limit"
        DELIVERY_LIMIT = "delivery_limit", "delivery limit (quorum queue)"

    class Anomaly(models.TextChoices):
        NONE = "", "none"
        BODY = "body", "body differs from the letter's"
        ROUTE = "route", "not routed here by the letter's publish"
        BODY_AND_ROUTE = "body+route", "body differs and not routed here"

    # Indexed by delivery_message_queue_idx (message first), not on its own.
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="deliveries", db_index=False)
    queue = models.CharField(max_length=255)
    consumer_tag = models.CharField(max_length=255, blank=True)
    delivery_tag = models.PositiveBigIntegerField(help_text="The channel's delivery tag (per channel, not global).")
    redelivered = models.BooleanField(default=False)
    attempt = models.PositiveIntegerField(default=1, help_text="This letter's nth delivery on this queue.")
    duplicate = models.BooleanField(
        default=False, help_text="The letter had already been handled; acked without running the handler again.",
    )
    exchange = models.CharField(max_length=255, blank=True, help_text="Exchange as delivered.")
    routing_key = models.CharField(max_length=255, blank=True, help_text="Routing key as delivered.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    # No database constraint: checking it cost PostgreSQL ~15–20 µs a delivery (a KEY SHARE lock on the
    # same worker row for every one), a fifth of its work per letter. The consumer writes the id of the
    # row it registered before consuming, and Django still sets it NULL when a worker row is deleted.
    worker = models.ForeignKey(
        "Worker", null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries", db_index=False,
        db_constraint=False,
    )
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    handled_at = models.DateTimeField(
        null=True, blank=True, help_text="When the handler succeeded (committed with the handler's own writes).",
    )
    settled_at = models.DateTimeField(
        null=True, blank=True,
        help_text="When it was acked, requeued or rejected (without a handler: written acked with the row, the ack "
                  "following the commit).",
    )
    error = models.TextField(blank=True, help_text="The handler's traceback, or why the delivery was not acked.")
    body_size = models.PositiveBigIntegerField(default=0, help_text="Size of the body delivered.")
    body_sha256 = models.CharField(max_length=64, blank=True, help_text="sha256 of the body delivered.")
    body = models.BinaryField(
        null=True, blank=True, editable=False,
        help_text="The bytes delivered, kept only when they differ from the letter's body.",
    )
    anomaly = models.CharField(
        max_length=16, choices=Anomaly.choices, default=Anomaly.NONE, blank=True,
        help_text="Why this delivery may not be the letter's: its body differs (another body under the same "
                  "message_id), or the letter's publish never routed it here. Reconciliation ignores it.",
    )

    # Retries and dead letters: the delay chosen after this attempt failed, and this copy's latest
    # `x-death` entry (messaging.amqp.deaths), when it arrived dead-lettered or back from a retry.
    # Defaults in the database too: the consumer's writers insert rows without these columns.
    retry_delay = models.DurationField(
        null=True, blank=True, help_text="After this attempt failed: how long the retry waits (consume --retry-delays).",
    )
    # Database defaults too: the consumer's writers insert with their own column lists (messaging.consumer.writers).
    dead_lettered_from = models.CharField(
        max_length=255, blank=True, db_default="", help_text="x-death: the queue that last dead-lettered this copy.",
    )
    death_reason = models.CharField(
        max_length=16, choices=DeathReason.choices, blank=True, db_default="",
        help_text="x-death: why it was dead-lettered.",
    )
    death_exchange = models.CharField(max_length=255, blank=True, db_default="",
                                      help_text="x-death: the exchange it was published to.")
    death_routing_keys = models.JSONField(default=list, db_default=Value([], output_field=models.JSONField()),
                                          blank=True, help_text="x-death: its routing keys.")
    death_count = models.PositiveIntegerField(
        default=0, db_default=0, help_text="x-death: how many times it died in that queue for that reason.",
    )
    died_at = models.DateTimeField(null=True, blank=True, help_text="x-death: when it last died there.")

    objects = DeliveryQuerySet.as_manager()

    class Meta:
        ordering = ["received_at", "id"]
        verbose_name_plural = "deliveries"
        indexes = [
            models.Index(fields=["message", "queue", "status"], name="delivery_message_queue_idx"),
            # The letter id rides along (index-only scans): "letters of the latest deliveries on a queue".
            models.Index(fields=["queue", "received_at", "message"], name="delivery_queue_recent_idx"),
            # Small (acked rows leave it): counts of the rare outcomes, the recent failures and their letters.
            models.Index(
                fields=["status", "received_at", "message"], name="delivery_unacked_recent_idx",
                condition=~models.Q(status="acked"),
            ),
            # Tiny (only marked deliveries): the admin's "forged or misrouted" filter, newest first.
            models.Index(fields=["received_at"], name="delivery_anomaly_idx", condition=~models.Q(anomaly="")),
            # Tiny (only dead-lettered copies): the admin's filters by death reason and original queue, newest first.
            models.Index(fields=["received_at"], name="delivery_death_idx", condition=~models.Q(death_reason="")),
        ]

    def __str__(self) -> str:
        return f"{self.message_id} on {self.queue} ({self.status})"

    @property
    def body_matches(self) -> bool:
        """The body delivered is the letter's (same sha256)."""
        return self.anomaly not in BODY_ANOMALIES

    @property
    def routed(self) -> bool:
        """The letter's publish routed it to where it was delivered."""
        return self.anomaly not in ROUTE_ANOMALIES


BODY_ANOMALIES = (Delivery.Anomaly.BODY, Delivery.Anomaly.BODY_AND_ROUTE)


ROUTE_ANOMALIES = (Delivery.Anomaly.ROUTE, Delivery.Anomaly.BODY_AND_ROUTE)


class Worker(models.Model):
    """One running (or stopped) `consume` process, refreshed by its heartbeat."""

    class Status(models.TextChoices):
        RUNNING = "running", "running"
        STOPPED = "stopped", "stopped"

    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    queues = models.JSONField(default=list)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING, db_index=True)
    started_at = models.DateTimeField(default=timezone.now)
    heartbeat_at = models.DateTimeField(default=timezone.now, db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    acked = models.PositiveBigIntegerField(default=0)
    requeued = models.PositiveBigIntegerField(default=0)
    rejected = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-heartbeat_at"]

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"

    @property
    def alive(self) -> bool:
        return self.status == self.Status.RUNNING and self.heartbeat_at >= timezone.now() - timedelta(seconds=60)


class StreamOffset(models.Model):
    """How far a tap has recorded a stream: written in the transaction of the batch that reached it."""

    stream = models.CharField(max_length=255, help_text="The stream queue's name.")
    tap = models.CharField(max_length=255, help_text="The tap's name (`consume --tap`; 'default' when not given).")
    offset = models.PositiveBigIntegerField(help_text="The stream offset of the last message recorded; "
                                                      "the tap resumes at the next one.")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["stream", "tap"], name="streamoffset_stream_tap_unique")]

    def __str__(self) -> str:
        return f"{self.stream} (tap {self.tap}) at {self.offset}"


class ApiToken(models.Model):
    """A bearer token with which a service uses the HTTP API as `user` (with that user's permissions)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. the calling service.")
    key_sha256 = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True,
                                        help_text="When the token was last used, to the minute.")
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Refused from then on; empty: never expires.")
    revoked_at = models.DateTimeField(null=True, blank=True, help_text="When an admin revoked it; refused since.")
    password_sha256 = models.CharField(
        max_length=64, blank=True, editable=False,
        help_text="The sha256 of the user's password hash when the token was made: a new password revokes it.",
    )

    def __str__(self) -> str:
        return f"{self.name} ({self.user})"

    @staticmethod
    def password_fingerprint(user) -> str:
        """What `password_sha256` holds for `user`'s password now (no SECRET_KEY in it: rotating that keeps tokens)."""
        return hashlib.sha256(user.password.encode("utf-8")).hexdigest()

    # Why a token that is no longer active is refused, by its state: the API's 401 says this.
    REFUSALS = {
        "revoked": "This API token was revoked.",
        "expired": "This API token has expired.",
        "password changed": "This API token was revoked: its user's password changed.",
    }

    def state(self, *, now=None) -> str:
        """'active', or why the token may not be used any more: 'revoked', 'expired' or 'password changed'."""
        now = now or timezone.now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.password_sha256 != self.password_fingerprint(self.user):
            return "password changed"
        return "active"
