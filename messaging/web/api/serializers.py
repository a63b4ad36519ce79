"""What the API reads and answers: a letter's payload (checked by `message_kwargs`), summaries, trails, list filters."""
from __future__ import annotations

import base64
from typing import Any

from rest_framework import serializers

from messaging.errors import InvalidMessage
from messaging.models import BODY_ANOMALIES, ROUTE_ANOMALIES, Delivery, Message
from messaging.outbox.requests import MAX_WAIT_SECONDS
from messaging.outbox.validation import EXCHANGE_TYPES, decode_body

TEXT_FIELDS = ("exchange", "exchange_type", "routing_key", "content_type", "content_encoding", "correlation_id",
               "message_id")


class IsoDateTimeField(serializers.DateTimeField):
    """A datetime as `isoformat()` writes it (`+00:00`), as the API has always answered."""

    def to_representation(self, value):
        return value.isoformat()


class PropertiesSerializer(serializers.Serializer):
    """The AMQP properties of a letter (documentation only: `message_kwargs` and the outbox check them)."""

    priority = serializers.IntegerField(required=False, min_value=0, max_value=255)
    reply_to = serializers.CharField(required=False, allow_blank=True)
    expiration = serializers.RegexField(r"^[0-9]*$", required=False, help_text="Milliseconds, as text.")
    timestamp = serializers.IntegerField(required=False, min_value=0, help_text="Seconds since 1970.")
    type = serializers.CharField(required=False, allow_blank=True)
    user_id = serializers.CharField(required=False, allow_blank=True)
    app_id = serializers.CharField(required=False, allow_blank=True)
    content_type = serializers.CharField(required=False, allow_blank=True)
    content_encoding = serializers.CharField(required=False, allow_blank=True)
    correlation_id = serializers.CharField(required=False, allow_blank=True)
    message_id = serializers.CharField(required=False, allow_blank=True)
    delivery_mode = serializers.ChoiceField(choices=[1, 2], required=False)


class MessageRequestSerializer(serializers.Serializer):
    """A letter to publish; unknown fields are refused (documentation: `message_kwargs` reads the payload)."""

    exchange = serializers.CharField(required=False, allow_blank=True,
                                     help_text="'' (the default) is the default exchange.")
    exchange_type = serializers.ChoiceField(choices=["", *EXCHANGE_TYPES], required=False,
                                            help_text="The type to declare the exchange with (with `declare`).")
    declare = serializers.BooleanField(required=False, help_text="Declare the queue or exchange if missing (durable when MAILROOM_DURABLE is true).")
    routing_key = serializers.CharField(required=False, allow_blank=True,
                                        help_text="The queue's name on the default exchange.")
    body = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False)
    body_base64 = serializers.CharField(required=False, help_text="Instead of `body`, for binary bodies.")
    body_encoding = serializers.ChoiceField(choices=["string", "base64"], required=False,
                                            help_text="How `body` is written (default string: UTF-8 text).")
    headers = serializers.DictField(required=False, allow_null=True, help_text="AMQP headers (a JSON object).")
    properties = PropertiesSerializer(required=False, allow_null=True)
    content_type = serializers.CharField(required=False, allow_blank=True)
    content_encoding = serializers.CharField(required=False, allow_blank=True)
    correlation_id = serializers.CharField(required=False, allow_blank=True)
    message_id = serializers.CharField(
        required=False, allow_blank=True,
        help_text="A retry with the same message_id and content answers 200 with the first letter; "
                  "other content is 409. A UUID when none is given.",
    )
    delivery_mode = serializers.ChoiceField(choices=[1, 2], required=False, help_text="2 (default): persistent.")
    wait_reply = serializers.FloatField(
        required=False, allow_null=True, min_value=0.001, max_value=MAX_WAIT_SECONDS,
        help_text="Request/reply: publish with reply_to (direct reply-to unless properties.reply_to names a queue a "
                  "`consume` worker reads) and a correlation_id (a UUID when none is given), wait up to this many "
                  "seconds and answer the reply in `reply` (null when none came in time).",
    )


MESSAGE_FIELDS = frozenset(MessageRequestSerializer().fields)


def message_kwargs(payload: dict) -> dict[str, Any]:
    """`create_message` keyword arguments from an API payload; raises `InvalidMessage` with what is wrong."""
    unknown = set(payload) - MESSAGE_FIELDS  # wait_reply is read by the view (`wait_seconds`)
    if unknown:
        raise InvalidMessage(f"Unknown fields: {', '.join(sorted(unknown))}.")
    for name in TEXT_FIELDS:
        if not isinstance(payload.get(name, ""), str):
            raise InvalidMessage(f"{name} must be a string.")
    if "body_base64" in payload:
        if "body" in payload:
            raise InvalidMessage("Give either body or body_base64, not both.")
        if not isinstance(payload["body_base64"], str):
            raise InvalidMessage("body_base64 must be a string.")
        body = decode_body(payload["body_base64"], encoding="base64")
    else:
        text = payload.get("body", "")
        if not isinstance(text, str):
            raise InvalidMessage("body must be a string (use body_base64 for binary bodies).")
        body = decode_body(text, encoding=payload.get("body_encoding", "string"))
    headers, properties = payload.get("headers") or {}, payload.get("properties") or {}
    if not isinstance(headers, dict) or not isinstance(properties, dict):
        raise InvalidMessage("headers and properties must be JSON objects.")
    properties = dict(properties)
    # The properties with fields of their own may be given at the top level or in `properties`.
    own = {}
    for name, default in (("content_type", ""), ("content_encoding", ""), ("correlation_id", ""),
                          ("message_id", ""), ("delivery_mode", 2)):
        value = properties.pop(name, default)
        own[name] = payload.get(name, value)
    for name in ("content_type", "content_encoding", "correlation_id", "message_id"):
        if not isinstance(own[name], str):
            raise InvalidMessage(f"{name} must be a string.")
    if type(own["delivery_mode"]) is not int or own["delivery_mode"] not in (1, 2):
        raise InvalidMessage("delivery_mode must be 1 (transient) or 2 (persistent).")
    declare = payload.get("declare", False)
    if not isinstance(declare, bool):
        raise InvalidMessage("declare must be true or false.")
    exchange_type = payload.get("exchange_type", "") or ("direct" if declare and payload.get("exchange") else "")
    return {
        "exchange": payload.get("exchange", ""), "exchange_type": exchange_type, "declare": declare,
        "routing_key": payload.get("routing_key", ""), "body": body, "headers": headers, "properties": properties,
        **own,
    }


class MessageSummarySerializer(serializers.Serializer):
    """A letter's outcome: the answer to a POST."""

    message_id = serializers.CharField()
    status = serializers.ChoiceField(choices=Message.Status.choices)
    last_error = serializers.CharField(help_text="Why the last publish attempt did not succeed.")
    attempts = serializers.IntegerField(help_text="Publish attempts so far.")
    next_attempt_at = IsoDateTimeField(allow_null=True, help_text="When the relay tries again (pending only).")


def message_summary(message: Message) -> dict[str, Any]:
    """The fields of `MessageSummarySerializer` for `message`."""
    pending = message.status == Message.Status.PENDING
    return {"message_id": message.message_id, "status": message.status, "last_error": message.last_error,
            "attempts": message.attempts, "next_attempt_at": message.next_attempt_at if pending else None}


class ReplySerializer(serializers.Serializer):
    """The reply to a request, recorded as a letter of its own (its in_reply_to is the request)."""

    message_id = serializers.CharField()
    correlation_id = serializers.CharField()
    content_type = serializers.CharField()
    body = serializers.CharField(allow_null=True, help_text="The body as UTF-8 text; null when it is not text.")
    body_base64 = serializers.CharField(help_text="The body's exact bytes, base64.")
    body_size = serializers.IntegerField()
    created_at = IsoDateTimeField(help_text="When it was received.")


def reply_fields(reply: Message) -> dict[str, Any]:
    """The fields of `ReplySerializer` for `reply`."""
    body = bytes(reply.body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"message_id": reply.message_id, "correlation_id": reply.correlation_id, "content_type": reply.content_type,
            "body": text, "body_base64": base64.b64encode(body).decode("ascii"), "body_size": reply.body_size,
            "created_at": reply.created_at}


class PublishedSerializer(MessageSummarySerializer):
    """A letter's outcome; with `wait_reply`, also the request's reply (or null) and a sentence on it."""

    correlation_id = serializers.CharField(required=False, help_text="With wait_reply: the request's correlation_id.")
    reply_to = serializers.CharField(required=False, help_text="With wait_reply: where the reply was awaited.")
    reply = ReplySerializer(required=False, allow_null=True, help_text="With wait_reply: the reply, or null.")
    reply_note = serializers.CharField(required=False, help_text="With wait_reply: e.g. 'No reply within 5 s.'")


def request_summary(outcome) -> dict[str, Any]:
    """The fields of `PublishedSerializer` for a `messaging.outbox.requests.RequestOutcome`."""
    request = outcome.request
    return {**message_summary(request), "correlation_id": request.correlation_id,
            "reply_to": request.properties.get("reply_to", ""),
            "reply": reply_fields(outcome.reply) if outcome.reply is not None else None, "reply_note": outcome.note}


class MessageRowSerializer(MessageSummarySerializer):
    """A letter in the list: its outcome, destination, body's size and digest, dates."""

    exchange = serializers.CharField()
    routing_key = serializers.CharField()
    body_size = serializers.IntegerField()
    body_sha256 = serializers.CharField()
    created_at = IsoDateTimeField()
    published_at = IsoDateTimeField(allow_null=True)


ROW_FIELDS = ("message_id", "status", "last_error", "attempts", "next_attempt_at", "exchange", "routing_key",
              "body_size", "body_sha256", "created_at", "published_at")


def message_row(message: Message) -> dict[str, Any]:
    """The fields of `MessageRowSerializer` for `message` (loaded with `ROW_FIELDS`)."""
    return {**message_summary(message), "exchange": message.exchange, "routing_key": message.routing_key,
            "body_size": message.body_size, "body_sha256": message.body_sha256, "created_at": message.created_at,
            "published_at": message.published_at}


class DeliverySerializer(serializers.Serializer):
    """One receipt of the letter by a consumer."""

    queue = serializers.CharField()
    status = serializers.ChoiceField(choices=Delivery.Status.choices)
    redelivered = serializers.BooleanField()
    attempt = serializers.IntegerField(help_text="This letter's nth delivery on this queue.")
    received_at = IsoDateTimeField()
    settled_at = IsoDateTimeField(allow_null=True)
    body_size = serializers.IntegerField(help_text="Size of the body delivered.")
    body_sha256 = serializers.CharField(help_text="sha256 of the body delivered ('' when not recorded).")
    body_matches = serializers.BooleanField(
        help_text="False when the body delivered differs from the letter's: another body under its message_id.")
    routed = serializers.BooleanField(
        help_text="False when the letter's publish did not route it here (same exchange and routing key, or an "
                  "x-death naming them); reconciliation does not count such a delivery.")
    retry_delay_seconds = serializers.FloatField(allow_null=True,
                                                 help_text="After this attempt failed: the retry's wait.")
    dead_lettered_from = serializers.CharField(help_text="x-death: the queue that last dead-lettered this copy ('').")
    death_reason = serializers.ChoiceField(choices=Delivery.DeathReason.choices,
                                           help_text="x-death: why ('' when not).")
    death_exchange = serializers.CharField(help_text="x-death: the exchange it was published to.")
    death_routing_keys = serializers.ListField(child=serializers.CharField(), help_text="x-death: its routing keys.")
    death_count = serializers.IntegerField(help_text="x-death: how many times it died there for that reason.")
    died_at = IsoDateTimeField(allow_null=True, help_text="x-death: when it last died there.")


DELIVERY_FIELDS = ("queue", "status", "redelivered", "attempt", "received_at", "settled_at", "body_size",
                   "body_sha256", "anomaly", "retry_delay", "dead_lettered_from", "death_reason", "death_exchange",
                   "death_routing_keys", "death_count", "died_at")


def delivery_row(values: dict[str, Any]) -> dict[str, Any]:
    """The fields of `DeliverySerializer` from a delivery's `DELIVERY_FIELDS` values."""
    anomaly, delay = values.pop("anomaly"), values.pop("retry_delay")
    return {**values, "retry_delay_seconds": delay.total_seconds() if delay is not None else None, "body_matches": anomaly not in BODY_ANOMALIES, "routed": anomaly not in ROUTE_ANOMALIES}


class MessageDetailSerializer(MessageRowSerializer):
    """A letter with its trail of deliveries (the latest ones, oldest first)."""

    republished_from = serializers.CharField(allow_null=True, help_text="The message_id this letter is a copy of.")
    in_reply_to = serializers.CharField(allow_null=True, help_text="The message_id of the request this letter answers.")
    replies = serializers.ListField(child=serializers.CharField(),
                                    help_text="The message_ids of this request's first replies (at most 100).")
    deliveries_truncated = serializers.BooleanField(help_text="True when there were more deliveries than listed.")
    deliveries = DeliverySerializer(many=True)


class MessageFilterSerializer(serializers.Serializer):
    """The list's filters (query parameters); all optional, combined with AND."""

    status = serializers.ChoiceField(choices=Message.Status.choices, required=False)
    queue = serializers.CharField(required=False, max_length=255, trim_whitespace=False,
                                  help_text="Letters with a delivery on this queue.")
    exchange = serializers.CharField(required=False, allow_blank=True, max_length=255, trim_whitespace=False,
                                     help_text="Letters published to this exchange (empty: the default exchange).")
    routing_key = serializers.CharField(required=False, allow_blank=True, max_length=255, trim_whitespace=False)
    since = serializers.DateTimeField(required=False, help_text="Created at or after (ISO 8601).")
    until = serializers.DateTimeField(required=False, help_text="Created before (ISO 8601).")
    search = serializers.CharField(
        required=False, max_length=1000, trim_whitespace=False,
        help_text="An exact message_id, correlation_id or routing key, or words: letters whose text body and header "
                  "values hold all of them (whole words, any case; a binary body is not searched).",
    )
