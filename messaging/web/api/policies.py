"""The policies every API view sets itself (whatever the host project's REST_FRAMEWORK): parser, pages, answers."""
from __future__ import annotations

import json

from drf_spectacular.openapi import AutoSchema
from rest_framework import exceptions, generics
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import BaseParser
from rest_framework.renderers import JSONRenderer

from messaging import conf
from messaging.models import Message
from messaging.web.api.auth import BearerTokenAuthentication, MessagePermissions
from messaging.web.api.errors import PayloadTooLarge, handle_error
from messaging.web.uploads import declared_length, upload_limit

AUTHENTICATION = (BearerTokenAuthentication, SessionAuthentication)  # the first one names the 401's WWW-Authenticate


class LetterParser(BaseParser):
    """application/json, read as the API always read it: the outbox's checks say what is wrong with a letter."""

    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None):
        request = parser_context["request"]
        limit = upload_limit(django_request(request).user)
        if limit is not None and declared_length(request) > limit:  # refused before reading any of it
            raise self.too_large(limit)
        raw = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(raw) > limit:
            raise self.too_large(limit)
        try:
            payload = json.loads(raw or b"{}")  # NaN is read, and refused by the checks as not finite
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise exceptions.ParseError(f"The request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise exceptions.ParseError("The request body must be a JSON object.")
        return payload

    @staticmethod
    def too_large(limit: int) -> PayloadTooLarge:
        """413: the request is over `limit`."""
        return PayloadTooLarge(f"The request is over {limit} bytes; a body may have at most "
                               f"{conf.get('MAILROOM_MAX_BODY_BYTES')} bytes.")


def django_request(request):
    """The HttpRequest under DRF's `request` (DRF sets its `user` to the user DRF authenticated)."""
    # Not DRF's `user`: a session's CSRF check parses the body while DRF is still authenticating, and
    # DRF's `user` would authenticate again (tests/test_uploads.py posts through a session).
    return request._request


class AlwaysJSON(DefaultContentNegotiation):
    """JSON whatever the Accept header says: the API has no other representation."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class MessagePagination(CursorPagination):
    """Newest first by an indexed column, no COUNT(*): `next`/`previous` carry an opaque cursor."""

    ordering = ("-created_at", "-pk")  # each filter's index ends in created_at (messaging/models.py)
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500
    page_size_query_description = f"Letters per page ({page_size} unless given, at most {max_page_size})."

    def decode_cursor(self, request):
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound:  # DRF's answer to a cursor it cannot read; it is a bad parameter
            raise exceptions.ValidationError({self.cursor_query_param: ["Invalid cursor."]}) from None


class ApiView(generics.GenericAPIView):
    """The policies of every API view, set here so that the host project's REST_FRAMEWORK changes none of them."""

    queryset = Message.objects.all()
    authentication_classes = AUTHENTICATION
    permission_classes = (MessagePermissions,)
    parser_classes = (LetterParser,)
    renderer_classes = (JSONRenderer,)
    content_negotiation_class = AlwaysJSON
    pagination_class = MessagePagination
    filter_backends = ()
    versioning_class = None
    metadata_class = None  # OPTIONS: 405
    schema = AutoSchema()

    def get_exception_handler(self):
        return handle_error
