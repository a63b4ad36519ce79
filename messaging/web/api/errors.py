"""Every API error in one JSON shape: {"detail": sentence, "code": word}, plus "errors" by field for invalid input."""
from __future__ import annotations

import logging

from django.core import signals
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from drf_spectacular.utils import OpenApiResponse
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

logger = logging.getLogger(__name__)


class InvalidLetter(exceptions.APIException):
    """The letter cannot be published as given (the outbox's sentence says why)."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"


class Conflict(exceptions.APIException):
    """The message_id is taken by a letter with other content."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class PayloadTooLarge(exceptions.APIException):
    """The request is over DATA_UPLOAD_MAX_MEMORY_SIZE."""

    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"
    default_detail = "The request body is too large."


class Unavailable(exceptions.APIException):
    """A service the answer needs does not answer (the RabbitMQ management API)."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "unavailable"


class ErrorSerializer(serializers.Serializer):
    """The body of every error answer (documentation only)."""

    detail = serializers.CharField(help_text="What went wrong, as a sentence.")
    code = serializers.CharField(help_text="A stable word for programs: invalid, parse_error, not_authenticated, "
                                           "authentication_failed, permission_denied, not_found, method_not_allowed, "
                                           "conflict, too_large, unsupported_media_type, throttled, unavailable, "
                                           "server_error.")
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()), required=False,
        help_text="Invalid fields or query parameters, each with its messages.",
    )


def error_response(description: str) -> OpenApiResponse:
    """An error in the OpenAPI schema: `ErrorSerializer` with `description`."""
    return OpenApiResponse(ErrorSerializer, description=description)


ERRORS = {
    400: error_response("Invalid input (`errors` lists the fields when there are several)."),
    401: error_response("No credentials, or invalid ones (`WWW-Authenticate: Bearer`)."),
    403: error_response("The user lacks the permission, or a session request lacks its CSRF token."),
    429: error_response("Throttled by the host project's settings (`Retry-After`)."),
    500: error_response("An unexpected error (logged on the server)."),
}


def error_body(exc: exceptions.APIException) -> dict:
    """The JSON of `exc` in the API's one shape."""
    if isinstance(exc.detail, dict):
        errors = {name: [str(m) for m in (messages if isinstance(messages, list) else [messages])]
                  for name, messages in exc.detail.items()}
    elif isinstance(exc.detail, list):
        errors = {"non_field_errors": [str(m) for m in exc.detail]}
    else:
        return {"detail": str(exc.detail), "code": getattr(exc.detail, "code", None) or exc.default_code}
    detail = " ".join(f"{name}: {' '.join(messages)}" for name, messages in errors.items())
    return {"detail": detail, "code": exc.default_code, "errors": errors}


def handle_error(exc: Exception, context: dict) -> Response:
    """DRF's handler (headers, rollback) with our body; anything unexpected is logged and answered 500."""
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, exceptions.UnsupportedMediaType):  # raised by DRF too (a session's CSRF check reads a form)
        exc = exceptions.UnsupportedMediaType(None, detail="Send the letter as application/json.")
    response = exception_handler(exc, context)
    if response is None:
        request = context.get("request")
        logger.error("api unexpected error view=%s", type(context.get("view")).__name__, exc_info=exc)
        # Django's own error reporting (and the test client) hear of it as of any uncaught exception.
        signals.got_request_exception.send(sender=None, request=getattr(request, "_request", request))
        set_rollback()
        return Response({"detail": "An unexpected error occurred.", "code": "server_error"},
                        status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    response.data = error_body(exc)
    return response
