"""How much of a request body is read: Django's limit for everyone, a letter's worth for those who may publish."""
from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.http import HttpResponse, QueryDict
from django.views.decorators.csrf import csrf_exempt, csrf_protect

from messaging import conf

PUBLISH_PERMISSION = "messaging.add_message"
# Room for a letter's other fields (destination, headers, properties, the CSRF token) beside its body.
OTHER_FIELDS_BYTES = 1024 * 1024
FORM = "application/x-www-form-urlencoded"


def publish_limit() -> int:
    """The largest request that may carry a body of MAILROOM_MAX_BODY_BYTES: a form's percent-encoding and
    JSON's \\u escapes write a byte of UTF-8 as up to 3 (base64: 4 for 3)."""
    return conf.get("MAILROOM_MAX_BODY_BYTES") * 3 + OTHER_FIELDS_BYTES


def upload_limit(user) -> int | None:
    """The bytes of body a request from `user` may send: publish_limit() for a user who may publish,
    Django's DATA_UPLOAD_MAX_MEMORY_SIZE for anyone else (None: no limit)."""
    default = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if default is not None and user.is_authenticated and user.has_perm(PUBLISH_PERMISSION):
        return max(default, publish_limit())
    return default


def declared_length(request) -> int:
    """The request's Content-Length (0 when absent or malformed: a WSGI request then reads no body)."""
    try:
        return max(int(request.META.get("CONTENT_LENGTH") or 0), 0)
    except ValueError:
        return 0


def too_large(limit: int, *, detail: str = "") -> HttpResponse:
    """413 with a sentence: the body is never read."""
    text = detail or f"The request is over {limit} bytes, the most this page accepts from you."
    return HttpResponse(text + "\n", status=413, content_type="text/plain; charset=utf-8")


def letter_form(view):
    """Let `view` (a form that publishes, behind login and messaging.add_message) read a form of up to
    publish_limit() from a user who may publish, and refuse a larger request from anyone with 413 unread."""
    # CsrfViewMiddleware would read the form at Django's limit before the view: the view is exempt
    # from it, and the same check runs here once the form is read.
    checked = csrf_protect(view)

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        length = declared_length(request)
        limit = upload_limit(request.user)
        if limit is not None and length > limit:
            return too_large(limit)
        default = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if request.method == "POST" and default is not None and length > default:  # a publisher's large form
            if request.content_type != FORM:  # Django's multipart parser keeps its own limit for fields
                return too_large(default, detail=f"A form over {default} bytes must be sent as {FORM}, "
                                                 "as this page's form is.")
            # Read once, at the length declared (never past it), and parsed as Django parses a form.
            request.POST = QueryDict(request.read(length), encoding="utf-8")
        return checked(request, *args, **kwargs)

    return csrf_exempt(wrapper)
