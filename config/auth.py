"""Login throttling (django-axes) as this project runs it: where a login comes from, and logins without a request."""
from __future__ import annotations

from axes.backends import AxesStandaloneBackend
from django.conf import settings
from django.http import HttpRequest


def client_address(request: HttpRequest) -> str | None:
    """The address a login comes from: the proxy's last X-Forwarded-For entry behind a proxy, else REMOTE_ADDR."""
    if getattr(settings, "SECURE_PROXY_SSL_HEADER", None):
        # Our proxy appends the address it saw; entries before it were written by the client and may be forged.
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        if forwarded[-1]:
            return forwarded[-1]
    return request.META.get("REMOTE_ADDR")


class LoginThrottle(AxesStandaloneBackend):
    """Refuses a login from a locked-out username or address; code that authenticates without a request passes."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            # Not a login over HTTP (the shell, a test client's `login`): there is no address to throttle.
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)
