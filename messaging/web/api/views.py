"""The API's views: list and publish letters, read one letter's trail; the OpenAPI schema and its docs page."""
from __future__ import annotations

from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils.decorators import method_decorator
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerSplitView
from rest_framework import exceptions, permissions
from rest_framework.response import Response
from rest_framework.utils.mediatypes import media_type_matches

from messaging.errors import DuplicateMessageId, InvalidMessage
from messaging.models import Delivery, Message
from messaging.outbox.publishing import create_message, new_message, same_content
from messaging.outbox.requests import publish_request, wait_seconds
from messaging.search import search as search_messages
from messaging.web.api.errors import ERRORS, Conflict, InvalidLetter, error_response, handle_error
from messaging.web.api.policies import AUTHENTICATION, ApiView
from messaging.web.api.serializers import (
    DELIVERY_FIELDS,
    ROW_FIELDS,
    MessageDetailSerializer,
    MessageFilterSerializer,
    MessageRequestSerializer,
    MessageRowSerializer,
    MessageSummarySerializer,
    PublishedSerializer,
    delivery_row,
    message_kwargs,
    message_row,
    message_summary,
    request_summary,
)
from messaging.web.links import message_url

API_REPLIES = 100  # the first replies a request's answer lists
API_DELIVERIES = 1000  # the latest deliveries a letter's answer lists ("deliveries_truncated": there were more)


def location(request, message_id: str) -> str:
    """The absolute URL of GET /api/messages/<message_id>/, the message_id one escaped path segment."""
    return request.build_absolute_uri(message_url("api-message", message_id))


def require_json(request) -> None:
    """415 unless the body is declared application/json (a form, text/plain...)."""
    if not any(media_type_matches(parser.media_type, request.content_type or "") for parser in request.parsers):
        raise exceptions.UnsupportedMediaType(request.content_type)


LOCATION = OpenApiParameter("Location", OpenApiTypes.URI, OpenApiParameter.HEADER, response=[200, 201, 202],
                            description="The URL of GET /api/messages/<message_id>/.")


# Annotated on the class: drf-spectacular builds a method's annotation on DEFAULT_SCHEMA_CLASS, which the
# host project may not point at drf-spectacular; a class's annotation builds on the class's own `schema`.
@extend_schema(
    methods=["GET"], parameters=[MessageFilterSerializer],
    responses={200: MessageRowSerializer(many=True), **ERRORS},
    description="Letters, newest first (by created_at). Needs messaging.view_message.",
)
@extend_schema(
    methods=["POST"], request=MessageRequestSerializer, parameters=[LOCATION],
    responses={
        201: OpenApiResponse(PublishedSerializer, description="Settled: published, unroutable or failed (with "
                                                              "wait_reply: and the reply, or null after the wait)."),
        202: OpenApiResponse(PublishedSerializer, description="Pending: the relay publishes it later."),
        200: OpenApiResponse(MessageSummarySerializer, description="A retry: the letter with this message_id "
                                                                   "and this content, as it is now."),
        **ERRORS,
        409: error_response("The message_id is taken by a letter with other content."),
        413: error_response("The request is over the upload limit."),
        415: error_response("The body is not application/json."),
    },
    description="Write the letter (pending), publish it after the commit and answer its outcome. With "
                "`wait_reply`, publish it as a request (reply_to, correlation_id) and answer its reply too: the "
                "request is answered whether or not a reply came. Needs messaging.add_message.",
)
@method_decorator(transaction.non_atomic_requests, name="dispatch")  # the publish follows this view's own commit
class MessageList(ApiView):
    """GET: letters newest first, filtered, a page at a time; POST: publish a letter through the outbox."""

    def get(self, request):
        filters = MessageFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        page = self.paginate_queryset(filtered(Message.objects.only(*ROW_FIELDS), **filters.validated_data))
        return self.get_paginated_response(MessageRowSerializer([message_row(m) for m in page], many=True).data)

    def post(self, request):
        require_json(request)
        try:
            fields = message_kwargs(request.data)
            wait = wait_seconds(request.data.get("wait_reply") if isinstance(request.data, dict) else None)
            if wait is not None:
                outcome = publish_request(wait=wait, **fields, origin=Message.Origin.API, user=request.user)
                message, answer = outcome.request, request_summary(outcome)
            else:
                with transaction.atomic():
                    message = create_message(**fields, origin=Message.Origin.API, user=request.user)
                answer = message_summary(message)
        except DuplicateMessageId:
            return self.retried(request, fields)
        except InvalidMessage as exc:
            raise InvalidLetter(str(exc)) from None
        code = 202 if message.status == Message.Status.PENDING else 201
        return Response(answer, status=code, headers={"Location": location(request, message.message_id)})

    def retried(self, request, fields: dict) -> Response:
        """The first letter's summary when this POST repeats it (after the unique constraint refused the new row)."""
        candidate = new_message(**fields, origin=Message.Origin.API, user=request.user)
        stored = Message.objects.defer("body").filter(message_id=candidate.message_id).first()
        if stored is None or not same_content(stored, candidate):
            raise Conflict(f"A letter with message_id {candidate.message_id!r} already exists, with other content.")
        return Response(message_summary(stored), status=200,
                        headers={"Location": location(request, stored.message_id)})


def filtered(messages, *, status=None, queue=None, exchange=None, routing_key=None, since=None, until=None,
             search=None):
    """`messages` narrowed by the list's filters (each one served by an index ending in created_at, or the
    search index)."""
    if status is not None:
        messages = messages.filter(status=status)
    if queue is not None:  # a probe of delivery_message_queue_idx per letter, or a semi-join the planner picks
        messages = messages.filter(Exists(Delivery.objects.filter(message=OuterRef("pk"), queue=queue)))
    if exchange is not None:
        messages = messages.filter(exchange=exchange)
    if routing_key is not None:
        messages = messages.filter(routing_key=routing_key)
    if since is not None:
        messages = messages.filter(created_at__gte=since)
    if until is not None:
        messages = messages.filter(created_at__lt=until)
    if search is not None:
        messages = search_messages(messages, search)
    return messages


@extend_schema(
    methods=["GET"], responses={
        200: MessageDetailSerializer, **ERRORS, 404: error_response("No letter with this message_id."),
    },
    parameters=[OpenApiParameter("message_id", str, OpenApiParameter.PATH,
                                 description="Any characters but NUL, percent-encoded as one segment; "
                                             "`.` and `..` as `%252E` and `%252E%252E` (the Location header's form).")],
    description="The letter and its latest deliveries, oldest first. Needs messaging.view_message.",
)
class MessageDetail(ApiView):
    """GET: one letter's outcome and its trail of deliveries."""

    pagination_class = None

    def get(self, request, message_id: str):
        found = Message.objects.defer("body").filter(message_id=message_id).first()
        if found is None:
            raise exceptions.NotFound("No letter with this message_id.")
        # The latest API_DELIVERIES (another producer may send one message_id again and again).
        deliveries = [delivery_row(d) for d in found.deliveries.newest_first().values(
            *DELIVERY_FIELDS)[:API_DELIVERIES + 1]]
        republished_from = (Message.objects.filter(pk=found.republished_from_id)
                            .values_list("message_id", flat=True).first() if found.republished_from_id else None)
        in_reply_to = (Message.objects.filter(pk=found.in_reply_to_id).values_list("message_id", flat=True).first()
                       if found.in_reply_to_id else None)
        # Only a letter Mailroom published with reply_to is answered (`messaging.consumer.linking`).
        replies = list(found.replies.order_by("created_at", "pk").values_list("message_id", flat=True)[:API_REPLIES]
                       if (found.properties or {}).get("reply_to") and found.origin != Message.Origin.EXTERNAL else [])
        return Response(MessageDetailSerializer({
            **message_row(found), "republished_from": republished_from, "in_reply_to": in_reply_to, "replies": replies,
            "deliveries_truncated": len(deliveries) > API_DELIVERIES, "deliveries": deliveries[:API_DELIVERIES][::-1],
        }).data)


@extend_schema(exclude=True)
class SchemaView(SpectacularJSONAPIView):
    """The OpenAPI 3 schema, public: it describes the API's shape, which the source shows anyway, and no data."""

    authentication_classes = AUTHENTICATION
    permission_classes = (permissions.AllowAny,)
    schema = AutoSchema()

    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)  # without the library's annotation (see above)

    def get_exception_handler(self):
        return handle_error


@extend_schema(exclude=True)
class DocsView(SpectacularSwaggerSplitView):
    """Swagger UI over the schema, its assets served from this site (drf-spectacular-sidecar), no inline script."""

    authentication_classes = AUTHENTICATION  # the session's CSRF token goes with "Try it out"
    permission_classes = (permissions.AllowAny,)
    url_name = "api-schema"
    title = "Mailroom API"
    template_name = "messaging/api_docs.html"
    schema = AutoSchema()

    def get_exception_handler(self):
        return handle_error

    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)  # without the library's annotation (see SchemaView)
