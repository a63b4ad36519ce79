"""Keep passwords out of logs, error pages and `diffsettings`; the JSON log format.

Django hides settings whose *name* looks secret (SECRET_KEY, PASSWORD, ...), but RABBITMQ_URL and
DATABASE_URL carry their password inside the value. `mask_credentials` masks it wherever it
appears, for the log filter and formatter, the DEBUG page's filter and reporter, and `diffsettings`.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from django.db.models import QuerySet
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter
from pythonjsonlogger.json import JsonFormatter

# A scheme starts where a word starts (so that a long run of letters is scanned once, not from each letter).
_SCHEME = r"(?<![a-zA-Z0-9+.-])[a-zA-Z][a-zA-Z0-9+.-]*://"
# `@host[:port]` and then what ends a URL's host part: its path, query or fragment, or the text after it.
_AT_HOST = r"""@(?:\[[^\]\s/]*\]|[^:@\s/?#'",;<>()\[\]{}\\|]*)(?::\d*)?(?:[\s/?#'",;<>()\[\]{}\\|]|$)"""
# `scheme://user:password@host` as pika (urllib) reads it: the userinfo runs to the *last* `@`
# before the host, so a password may hold `@`, spaces, commas and `%`-escapes; it never crosses a
# path or a line. A password without quotes is tried first, so that a URL inside a quoted repr
# does not swallow the values after it.
_PASSWORD_CHAR = r"[^/?#\n]"  # without `/`, it never reaches the next URL's `scheme://`
_CREDENTIALS = re.compile(
    rf"(?P<scheme>{_SCHEME})(?P<user>[^:/?#@\n]*):"
    rf"(?P<password>(?:(?!['\"]){_PASSWORD_CHAR})*(?={_AT_HOST})|{_PASSWORD_CHAR}*(?={_AT_HOST}))@"
)


def mask_credentials(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` replaced by '***'."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


class MaskSecretsFilter(logging.Filter):
    """Rewrites each record's message so that no URL password reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_credentials(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # The traceback text is formatted later by the handler: mask it here, once.
            record.exc_text = mask_credentials(logging.Formatter().formatException(record.exc_info))
        return True


class SecretsJsonFormatter(JsonFormatter):
    """One JSON object a line (MAILROOM_LOG_FORMAT=json): time, level, logger, message, and the
    record's `extra` fields (`message_id`, `queue`), with URL passwords masked in all of them."""

    def __init__(self, fmt: str = "%(levelname)s %(name)s %(message)s", **kwargs: Any) -> None:
        kwargs.setdefault("timestamp", "time")
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        super().__init__(fmt, **kwargs)

    def serialize_log_record(self, log_data: dict[str, Any]) -> str:
        # The whole line: a traceback (formatted here, not from the filter's exc_text) or an
        # extra field may carry a URL too.
        return mask_credentials(super().serialize_log_record(log_data))


def safe_repr(value: Any) -> str:
    """The repr of `value` with URL passwords masked, never touching the database and never raising."""
    if isinstance(value, QuerySet) and value._result_cache is None:
        # Its repr would run the query: during a database outage, a second error inside the error page.
        return f"<{type(value).__name__} (not evaluated)>"
    try:
        return mask_credentials(repr(value))
    except Exception as exc:  # noqa: BLE001 - any repr may fail (a lazy object, a closed connection)
        return f"<{type(value).__name__} (repr failed: {type(exc).__name__})>"


class _MaskedRepr:
    """Shows a value on the DEBUG page by its `safe_repr`."""

    def __init__(self, value: Any) -> None:
        self._repr = safe_repr(value)

    def __repr__(self) -> str:
        return self._repr


class SecretsExceptionReporterFilter(SafeExceptionReporterFilter):
    """Django's filter, plus URL passwords masked in settings, request META and frame variables."""

    def cleanse_setting(self, key, value):
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str):  # a lazy string too (django-axes' settings): str() evaluates it
            return mask_credentials(str(cleansed))
        return cleansed

    def get_traceback_frame_variables(self, request, tb_frame):
        return [
            (name, _MaskedRepr(value) if value is not self.cleansed_substitute else value)
            for name, value in super().get_traceback_frame_variables(request, tb_frame)
        ]


class SecretsExceptionReporter(ExceptionReporter):
    """The DEBUG error page and the error e-mail with every URL password masked, messages included."""

    def get_traceback_html(self) -> str:
        return mask_credentials(super().get_traceback_html())

    def get_traceback_text(self) -> str:
        return mask_credentials(super().get_traceback_text())
