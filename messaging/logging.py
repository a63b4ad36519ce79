"""Logging helpers: keep the broker password out of every log line."""
from __future__ import annotations

import logging
import re

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
        return True
