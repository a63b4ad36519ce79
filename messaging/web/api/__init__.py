"""The HTTP API for other services (Django REST Framework): publish through the outbox, list letters, read a trail.

Authentication: `Authorization: Bearer <key>` with a key made by `manage.py create_api_token`
(only its sha256 is stored), acting as the token's user with that user's permissions; or the
browser's session, in which case a POST needs the CSRF token as any form does.
"""
from messaging.web.api.auth import create_token, hash_key

__all__ = ["create_token", "hash_key"]
