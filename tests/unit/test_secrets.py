"""messaging.logging: URL passwords masked in log records, error pages and settings."""
from __future__ import annotations

import logging
import sys

from messaging.logging import (
    MaskSecretsFilter,
    SecretsExceptionReporterFilter,
    mask_credentials,
)

PASSWORD = "s3cr3t-Pw"


def test_mask_credentials_hides_every_password_and_keeps_the_rest():
    text = (f"broker amqp://mailroom:{PASSWORD}@mq.example:5671/%2F, "
            f"amqps://other:{PASSWORD}x@10.0.0.2/vh and postgres://db:{PASSWORD}@db/mailroom")
    assert mask_credentials(text) == ("broker amqp://mailroom:***@mq.example:5671/%2F, "
                                      "amqps://other:***@10.0.0.2/vh and postgres://db:***@db/mailroom")


def test_mask_credentials_leaves_urls_without_a_password_alone():
    for text in ("http://mq.example:8080/api", "amqp://user@host/%2F", "no url here: a:b@c"):
        assert mask_credentials(text) == text


def record(msg: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("messaging.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_the_log_filter_masks_the_message_with_its_arguments():
    rec = record("connecting to %s (attempt %d)", f"amqp://guest:{PASSWORD}@mq/%2F", 3)
    assert MaskSecretsFilter().filter(rec) is True  # masked, never dropped
    assert rec.getMessage() == "connecting to amqp://guest:***@mq/%2F (attempt 3)"
    plain = record("nothing secret %s", "here")
    MaskSecretsFilter().filter(plain)
    assert plain.args == ("here",)  # left as it was


def test_the_log_filter_masks_the_traceback():
    try:
        raise ConnectionError(f"cannot reach amqp://guest:{PASSWORD}@mq/%2F")
    except ConnectionError:
        rec = record("failed", exc_info=sys.exc_info())
    MaskSecretsFilter().filter(rec)
    assert "ConnectionError: cannot reach amqp://guest:***@mq/%2F" in rec.exc_text
    assert PASSWORD not in logging.Formatter().format(rec)


def test_the_error_page_filter_masks_url_settings(settings):
    settings.RABBITMQ_URL = f"amqp://mailroom:{PASSWORD}@mq/%2F"
    reporter = SecretsExceptionReporterFilter()
    assert reporter.cleanse_setting("RABBITMQ_URL", settings.RABBITMQ_URL) == "amqp://mailroom:***@mq/%2F"
    assert reporter.get_safe_settings()["RABBITMQ_URL"] == "amqp://mailroom:***@mq/%2F"
    assert reporter.cleanse_setting("SECRET_KEY", "anything") == reporter.cleansed_substitute  # Django's own rule
