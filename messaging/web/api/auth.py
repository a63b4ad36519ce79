"""Who calls the API: bearer tokens (only their sha256 stored) or the browser's session, and what they may do."""
from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from messaging.models import ApiToken

TOKEN_BYTES = 32
REALM = "mailroom"
# `last_used_at` is written at most this often, so that a busy service does not write a row per request.
LAST_USED_PRECISION = timedelta(minutes=1)


def hash_key(key: str) -> str:
    """The sha256 of a key, as `ApiToken.key_sha256` stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_token(*, user, name: str, expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """A new token for `user`, bound to the user's password; returns it with the key, shown once and never stored."""
    key = "mr_" + secrets.token_urlsafe(TOKEN_BYTES)
    token = ApiToken.objects.create(user=user, name=name, key_sha256=hash_key(key), expires_at=expires_at,
                                    password_sha256=ApiToken.password_fingerprint(user))
    return token, key


def revoke_tokens(tokens) -> int:
    """Revokes the tokens of a queryset not revoked yet (they stay listed); returns how many."""
    return tokens.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())


def note_use(token: ApiToken, *, now: datetime) -> None:
    """Records that `token` was used, unless that was recorded less than LAST_USED_PRECISION ago."""
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_PRECISION:
        return
    # Conditional, so that concurrent requests of the same minute write it once between them.
    recent = now - LAST_USED_PRECISION
    (ApiToken.objects.filter(pk=token.pk).exclude(last_used_at__gt=recent)
     .update(last_used_at=now))


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <key>` acting as the token's active user; any other Authorization header is refused."""

    def authenticate(self, request):
        header = request.headers.get("Authorization", "")
        if not header:
            return None  # the next class: the session
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise exceptions.AuthenticationFailed("Use Authorization: Bearer <token>.")
        token = ApiToken.objects.select_related("user").filter(key_sha256=hash_key(key.strip())).first()
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or unknown API token.")
        now = timezone.now()
        state = token.state(now=now)
        if state != "active":
            raise exceptions.AuthenticationFailed(ApiToken.REFUSALS[state])
        note_use(token, now=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        return f'Bearer realm="{REALM}"'


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """The bearer token in the OpenAPI schema's securitySchemes."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer",
                "description": "A key made by `manage.py create_api_token USER --name NAME [--expires-in 30d]`; "
                               "refused once expired, revoked, or when its user's password changes."}


class MessagePermissions(permissions.DjangoModelPermissions):
    """Reading needs messaging.view_message, publishing messaging.add_message (other methods: 405)."""

    perms_map = {
        "GET": ["%(app_label)s.view_%(model_name)s"], "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "POST": ["%(app_label)s.add_%(model_name)s"], "OPTIONS": [], "PUT": [], "PATCH": [], "DELETE": [],
    }

    def has_permission(self, request, view) -> bool:
        allowed = super().has_permission(request, view)
        if not allowed and request.user and request.user.is_authenticated:
            model = view.get_queryset().model
            # An instance per request: the message names what is missing.
            self.message = f"Permission {', '.join(self.get_required_permissions(request.method, model))} required."
        return allowed
