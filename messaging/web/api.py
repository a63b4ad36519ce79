"""The HTTP API for other services: publish through the same outbox path, read a message's trail.

Authentication: `Authorization: Bearer <key>` with a key made by `manage.py create_api_token`
(only its sha256 is stored), acting as the token's user with that user's permissions; or the
browser's session, in which case a POST needs the CSRF token as any form does.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from http import HTTPStatus

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import transaction
from django.http import HttpRequest, JsonResponse, RawPostDataException
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from messaging import conf
from messaging.errors import InvalidMessage
from messaging.models import ApiToken, Message
from messaging.outbox.publishing import create_message
from messaging.outbox.validation import decode_body

TOKEN_BYTES = 32
API_DELIVERIES = 1000  # the latest deliveries a message's answer lists ("deliveries_truncated" says when there were more)
MESSAGE_FIELDS = {"exchange", "exchange_type", "declare", "routing_key", "body", "body_base64", "body_encoding",
                 "headers", "properties", "content_type", "content_encoding", "correlation_id", "message_id",
                 "delivery_mode"}


# --- tokens ---------------------------------------------------------------------------------
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_token(*, user, name: str) -> tuple[ApiToken, str]:
    """A new token for `user`; returns it with the key, which is shown once and never stored."""
    key = "mr_" + secrets.token_urlsafe(TOKEN_BYTES)
    token = ApiToken.objects.create(user=user, name=name, key_sha256=hash_key(key))
    return token, key


def authenticate_bearer(request: HttpRequest):
    """The active user of a valid `Authorization: Bearer` key; None without the header; False when invalid."""
    header = request.headers.get("Authorization", "")
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return False
    token = ApiToken.objects.select_related("user").filter(key_sha256=hash_key(key.strip())).first()
    if token is None or not token.user.is_active:
        return False
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token.user


def _error(status: HTTPStatus, detail: str, **extra) -> JsonResponse:
    response = JsonResponse({"detail": detail, **extra}, status=status)
    if status == HTTPStatus.UNAUTHORIZED:
        response["WWW-Authenticate"] = 'Bearer realm="mailroom"'
    return response


def api_view(permission: str):
    """Authenticate (bearer token, or session with CSRF on unsafe methods) and check `permission`."""
    def decorate(view):
        @csrf_exempt  # bearer requests carry no cookie; session requests are checked below
        def wrapped(request, *args, **kwargs):
            user = authenticate_bearer(request)
            if user is False:
                return _error(HTTPStatus.UNAUTHORIZED, "Invalid or unknown API token.")
            if user is None:
                if not request.user.is_authenticated:
                    return _error(HTTPStatus.UNAUTHORIZED, "Authentication required: Authorization: Bearer <token>.")
                if request.method not in ("GET", "HEAD", "OPTIONS"):
                    reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
                    if reason is not None:
                        return _error(HTTPStatus.FORBIDDEN, "CSRF check failed (session authentication).")
                user = request.user
            else:
                request.user = user
            if not user.has_perm(permission):
                return _error(HTTPStatus.FORBIDDEN, f"Permission {permission} required.")
            return view(request, *args, **kwargs)
        return wrapped
    return decorate


# --- views ----------------------------------------------------------------------------------
@api_view("messaging.add_message")
def messages(request):
    """POST /api/messages/: write the message (pending), publish after commit; 201 when settled, 202 when pending."""
    if request.method != "POST":
        return _error(HTTPStatus.METHOD_NOT_ALLOWED, "POST a letter here; GET /api/messages/<message_id>/ reads one.")
    try:
        raw = request.body
    except RequestDataTooBig:
        return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                      f"The request is over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes; "
                      f"a body may have at most {conf.get('MAILROOM_MAX_BODY_BYTES')} bytes.")
    except RawPostDataException:  # a session POST as a form (multipart): the CSRF check has read it already
        return _error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Send the letter as application/json.")
    try:
        payload = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        return _error(HTTPStatus.BAD_REQUEST, f"The request body is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return _error(HTTPStatus.BAD_REQUEST, "The request body must be a JSON object.")
    try:
        kwargs = message_kwargs(payload)
        with transaction.atomic():
            message = create_message(**kwargs, origin=Message.Origin.API, user=request.user)
    except InvalidMessage as exc:
        status = HTTPStatus.CONFLICT if "already exists" in str(exc) else HTTPStatus.BAD_REQUEST
        return _error(status, str(exc))
    code = HTTPStatus.ACCEPTED if message.status == Message.Status.PENDING else HTTPStatus.CREATED
    return JsonResponse(message_summary(message), status=code)


def message_kwargs(payload: dict) -> dict:
    """`create_message` keyword arguments from an API payload; raises `InvalidMessage` with what is wrong."""
    unknown = set(payload) - MESSAGE_FIELDS
    if unknown:
        raise InvalidMessage(f"Unknown fields: {', '.join(sorted(unknown))}.")
    text_fields = ("exchange", "exchange_type", "routing_key", "content_type", "content_encoding",
                   "correlation_id", "message_id")
    for name in text_fields:
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


def message_summary(message: Message) -> dict:
    return {"message_id": message.message_id, "status": message.status, "last_error": message.last_error,
            "attempts": message.attempts,
            "next_attempt_at": message.next_attempt_at.isoformat() if message.next_attempt_at and
            message.status == Message.Status.PENDING else None}


@api_view("messaging.view_message")
def message(request, message_id: str):
    """GET /api/messages/<message_id>/: the message's status and its trail of deliveries."""
    if request.method not in ("GET", "HEAD"):
        return _error(HTTPStatus.METHOD_NOT_ALLOWED, "Only GET here.")
    found = Message.objects.defer("body").filter(message_id=message_id).first()
    if found is None:
        return _error(HTTPStatus.NOT_FOUND, "No letter with this message_id.")
    # The latest API_DELIVERIES (another producer may send one message_id again and again).
    deliveries = list(found.deliveries.newest_first().values(
        "queue", "status", "redelivered", "attempt", "received_at", "settled_at",
    )[:API_DELIVERIES + 1])
    truncated = len(deliveries) > API_DELIVERIES
    deliveries = deliveries[:API_DELIVERIES][::-1]
    republished_from = (Message.objects.filter(pk=found.republished_from_id).values_list("message_id", flat=True)
                        .first() if found.republished_from_id else None)
    return JsonResponse({
        **message_summary(found),
        "exchange": found.exchange, "routing_key": found.routing_key, "body_size": found.body_size,
        "body_sha256": found.body_sha256,
        "created_at": found.created_at.isoformat(),
        "published_at": found.published_at.isoformat() if found.published_at else None,
        "republished_from": republished_from,
        "deliveries_truncated": truncated,
        "deliveries": [
            {**d, "received_at": d["received_at"].isoformat(),
             "settled_at": d["settled_at"].isoformat() if d["settled_at"] else None}
            for d in deliveries
        ],
    })

