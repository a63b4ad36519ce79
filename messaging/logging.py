"""Keep passwords out of logs, error pages and `diffsettings`; the JSON log format.

Django hides settings whose *name* looks secret (SECRET_KEY, PASSWORD, ...), but RABBITMQ_URL and
DATABASE_URL carry their password inside the value: these helpers mask `scheme://user:password@`
wherever it appears.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter
from pythonjsonlogger.json import JsonFormatter

# user:password@ in any URL-like text (amqp://, http://, postgres:// …).
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")


def mask_credentials(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` replaced by '***'."""
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


class _MaskedRepr:
    """Shows a value on the DEBUG page by its repr, with URL passwords masked."""

    def __init__(self, value: Any) -> None:
        self._repr = mask_credentials(repr(value))

    def __repr__(self) -> str:
        return self._repr


class SecretsExceptionReporterFilter(SafeExceptionReporterFilter):
    """Django's filter, plus URL passwords masked in settings, request META and frame variables."""

    def cleanse_setting(self, key, value):
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str):
            return mask_credentials(cleansed)
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
