"""The API's dead letters: the dead-letter queues, and what is in one grouped by original queue and reason,
each message with its trail (messaging.web.deadletters reads them, as the pages do)."""
from __future__ import annotations

import base64
from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.response import Response

from messaging.amqp import peeking
from messaging.amqp.deaths import REASONS
from messaging.errors import ManagementRefused, ManagementUnavailable
from messaging.models import Delivery, Message
from messaging.web import deadletters
from messaging.web.api.errors import ERRORS, Conflict, Unavailable, error_response
from messaging.web.api.policies import ApiView
from messaging.web.api.serializers import IsoDateTimeField
from messaging.web.display import body_part


class DeadLetterQueueSerializer(serializers.Serializer):
    """A queue bound to a dead-letter exchange."""

    name = serializers.CharField()
    messages = serializers.IntegerField(help_text="Ready and unacknowledged messages.")
    consumers = serializers.IntegerField(allow_null=True)
    type = serializers.CharField(help_text="classic, quorum or stream.")
    dead_letter_exchanges = serializers.ListField(child=serializers.CharField(),
                                                  help_text="The dead-letter exchanges it is bound to.")
    dead_letters_from = serializers.ListField(
        child=serializers.CharField(), help_text="The queues naming those exchanges as their dead-letter exchange.")


class DeadLetterQueueListSerializer(serializers.Serializer):
    queues = DeadLetterQueueSerializer(many=True)


class DeathSerializer(serializers.Serializer):
    """One x-death entry, most recent first."""

    queue = serializers.CharField()
    reason = serializers.ChoiceField(choices=REASONS)
    exchange = serializers.CharField()
    routing_keys = serializers.ListField(child=serializers.CharField())
    count = serializers.IntegerField()
    time = IsoDateTimeField(allow_null=True)


class StepSerializer(serializers.Serializer):
    """One delivery of the letter (its trail), oldest first."""

    queue = serializers.CharField()
    received_at = IsoDateTimeField()
    status = serializers.ChoiceField(choices=Delivery.Status.choices)
    attempt = serializers.IntegerField()
    retry_delay_seconds = serializers.FloatField(allow_null=True, help_text="The retry's wait after this attempt.")
    error = serializers.CharField(help_text="The last line of the error ('' when none).")
    death_reason = serializers.CharField(help_text="x-death's reason when it arrived dead-lettered ('' when not).")
    dead_lettered_from = serializers.CharField()


class DeadLetterSerializer(serializers.Serializer):
    """A message read from the dead-letter queue (and put back), with its letter's trail when the history has it."""

    position = serializers.IntegerField(help_text="1 for the head of the queue.")
    message_id = serializers.CharField()
    redelivered = serializers.BooleanField()
    exchange = serializers.CharField()
    routing_key = serializers.CharField()
    body = serializers.CharField(allow_null=True, help_text="The body as text (null when binary: see body_base64).")
    body_base64 = serializers.CharField(allow_null=True, help_text="The body's part read, base64 (binary bodies).")
    body_size = serializers.IntegerField()
    body_truncated = serializers.BooleanField(help_text=f"Only the first {peeking.BODY_BYTES} bytes were read.")
    headers = serializers.DictField()
    properties = serializers.DictField()
    deaths = DeathSerializer(many=True)
    letter_status = serializers.ChoiceField(choices=Message.Status.choices, allow_null=True,
                                            help_text="The letter's status (null: not in the history).")
    trail = StepSerializer(many=True)


class GroupSerializer(serializers.Serializer):
    original_queue = serializers.CharField(help_text="The queue that dead-lettered them ('' without x-death).")
    reason = serializers.CharField(help_text="rejected, expired, maxlen or delivery_limit ('' without x-death).")
    messages = DeadLetterSerializer(many=True)


class ContentsSerializer(serializers.Serializer):
    """What is at the head of a dead-letter queue, grouped by original queue and reason."""

    queue = serializers.CharField()
    depth = serializers.IntegerField(help_text="Ready and unacknowledged messages in the queue.")
    read = serializers.IntegerField(help_text="Messages read from its head.")
    notice = serializers.CharField(help_text="What reading did to the messages.")
    original_queues = serializers.ListField(child=serializers.CharField())
    reasons = serializers.ListField(child=serializers.CharField())
    groups = GroupSerializer(many=True)


class ContentsFilterSerializer(serializers.Serializer):
    """The filters (query parameters)."""

    original = serializers.CharField(required=False, max_length=255, trim_whitespace=False,
                                     help_text=f"Original queue (exact); {deadletters.NO_DEATH}: without x-death.")
    reason = serializers.ChoiceField(choices=[*REASONS, deadletters.NO_DEATH], required=False,
                                     help_text=f"{deadletters.NO_DEATH}: without x-death.")
    count = serializers.IntegerField(
        required=False, min_value=1, max_value=peeking.MAX_PEEK,
        help_text=f"Messages to read from the head ({deadletters.DEFAULT_COUNT} unless given).")


UNAVAILABLE = {503: error_response("The RabbitMQ management API is not configured or does not answer.")}


class ListSchema(AutoSchema):
    """A list without pagination is named "_retrieve" by default, as the detail is."""

    def get_operation_id(self):
        return "dead_letters_list"


@extend_schema(methods=["GET"], responses={200: DeadLetterQueueListSerializer, **ERRORS, **UNAVAILABLE},
               description="The dead-letter queues (through the management API). Needs messaging.view_message.")
class DeadLetterQueueList(ApiView):
    """GET: the dead-letter queues with their depth."""

    pagination_class = None
    schema = ListSchema()

    def get(self, request):
        try:
            queues = deadletters.dead_letter_queues()
        except ManagementUnavailable as exc:
            raise Unavailable(str(exc)) from None
        return Response(DeadLetterQueueListSerializer({"queues": [{
            "name": q.name, "messages": q.messages, "consumers": q.consumers, "type": q.kind,
            "dead_letter_exchanges": list(q.exchanges), "dead_letters_from": list(q.sources),
        } for q in queues]}).data)


@extend_schema(
    methods=["GET"], parameters=[ContentsFilterSerializer, OpenApiParameter(
        "queue", str, OpenApiParameter.PATH, description="The queue's name, percent-encoded as one segment.")],
    responses={200: ContentsSerializer, **ERRORS, 404: error_response("No queue with this name."),
               409: error_response("RabbitMQ refused to read the queue (a stream queue, say)."), **UNAVAILABLE},
    description="The messages at the head of a dead-letter queue, each put back at once (marked redelivered), "
                "grouped by original queue and reason, with their trails. Needs messaging.view_message.",
)
class DeadLetterQueueDetail(ApiView):
    """GET: what is in one dead-letter queue."""

    pagination_class = None

    def get(self, request, queue: str):
        filters = ContentsFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        d = filters.validated_data
        try:
            found = deadletters.contents(queue, count=d.get("count", deadletters.DEFAULT_COUNT),
                                         original=d.get("original"), reason=d.get("reason"))
        except ManagementUnavailable as exc:
            raise Unavailable(str(exc)) from None
        except ManagementRefused as exc:
            raise Conflict(str(exc)) from None
        if found is None:
            raise exceptions.NotFound("No queue with this name.")
        return Response(ContentsSerializer({
            "queue": found.queue, "depth": found.depth, "read": found.read, "notice": peeking.NOTICE,
            "original_queues": found.originals, "reasons": found.reasons,
            "groups": [{"original_queue": g.original_queue, "reason": g.reason,
                        "messages": [dead_letter(letter) for letter in g.letters]} for g in found.groups],
        }).data)


def dead_letter(letter: deadletters.DeadLetter) -> dict[str, Any]:
    """The fields of `DeadLetterSerializer` for `letter`."""
    copy = letter.copy
    shown = body_part(copy.body, size=copy.size)
    return {
        "position": copy.position, "message_id": copy.message_id, "redelivered": copy.redelivered,
        "exchange": copy.exchange, "routing_key": copy.routing_key,
        "body": None if shown["binary"] else shown["text"],
        "body_base64": base64.b64encode(copy.body).decode() if shown["binary"] else None,
        "body_size": copy.size, "body_truncated": copy.truncated, "headers": copy.headers,
        "properties": copy.properties,
        "deaths": [{"queue": d.queue, "reason": d.reason, "exchange": d.exchange, "routing_keys": list(d.routing_keys),
                    "count": d.count, "time": d.time} for d in copy.deaths],
        "letter_status": letter.message.status if letter.message else None,
        "trail": [{"queue": s.queue, "received_at": s.received_at, "status": s.status, "attempt": s.attempt,
                   "retry_delay_seconds": s.retry_delay.total_seconds() if s.retry_delay is not None else None,
                   "error": s.error, "death_reason": s.death_reason, "dead_lettered_from": s.dead_lettered_from}
                  for s in letter.trail],
    }
