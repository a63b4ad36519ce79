"""MAILROOM_LOG_FORMAT: the settings' JSON formatter, what selects it, and secrets kept out of it."""
from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from messaging.logging import MaskSecretsFilter
from messaging.outbox.publishing import log_fields

SETTINGS_FILE = Path(__file__).resolve().parents[2] / "config" / "settings.py"
PASSWORD = "s3cr3t-Pw"


def formatter(name: str) -> logging.Formatter:
    """The formatter `name` of settings.LOGGING, made as logging.config makes it."""
    conf = dict(settings.LOGGING["formatters"][name])
    if "()" in conf:
        return import_string(conf.pop("()"))(**conf)
    return logging.Formatter(conf["format"])


def record(msg: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("messaging.consumer.handlers", logging.WARNING, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)  # as logger.warning(..., extra=extra) does
    return rec


def test_a_json_line_carries_level_logger_message_time_and_the_extra_fields():
    rec = record("delivery=%s message=%s handler failed", 7, 3, message_id="order-42", queue="orders")
    line = formatter("json").format(rec)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "WARNING"
    assert data["logger"] == "messaging.consumer.handlers"
    assert data["message"] == "delivery=7 message=3 handler failed"
    assert data["message_id"] == "order-42" and data["queue"] == "orders"
    assert data["time"].endswith("+00:00")  # ISO 8601, UTC


def test_the_text_format_is_unchanged_by_the_extra_fields():
    rec = record("delivery=%s handler failed", 7, message_id="order-42", queue="orders")
    assert formatter("text").format(rec).endswith(" WARNING messaging.consumer.handlers delivery=7 handler failed")


def test_json_lines_mask_passwords_in_the_message_the_traceback_and_the_extra_fields():
    try:
        raise ConnectionError(f"cannot reach amqp://mailroom:{PASSWORD}@mq/%2F")
    except ConnectionError:
        exc_info = sys.exc_info()
    rec = record("connecting to %s", f"amqp://mailroom:{PASSWORD}@mq/%2F", exc_info=exc_info,
                 url=f"postgres://db:{PASSWORD}@db/mailroom")
    # The formatter masks on its own (another handler may have no filter), and after the filter.
    for filtered in (False, True):
        if filtered:
            MaskSecretsFilter().filter(rec)
        line = formatter("json").format(rec)
        assert PASSWORD not in line
        data = json.loads(line)
        assert data["message"] == "connecting to amqp://mailroom:***@mq/%2F"
        assert "ConnectionError: cannot reach amqp://mailroom:***@mq/%2F" in data["exc_info"]
        assert data["url"] == "postgres://db:***@db/mailroom"


def settings_with(monkeypatch, value: str | None, captured: list | None = None) -> dict:
    """config/settings.py run afresh with MAILROOM_LOG_FORMAT=value (unset for None); its calls of
    `logging.captureWarnings` go to `captured` instead of changing this process's warnings."""
    monkeypatch.setattr(logging, "captureWarnings", (captured if captured is not None else []).append)
    if value is None:
        monkeypatch.delenv("MAILROOM_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("MAILROOM_LOG_FORMAT", value)
    return runpy.run_path(str(SETTINGS_FILE))


@pytest.mark.parametrize(("value", "chosen"), [(None, "text"), ("text", "text"), ("json", "json"), (" JSON ", "json")])
def test_mailroom_log_format_chooses_the_console_formatter(monkeypatch, value, chosen):
    captured = []
    logging_conf = settings_with(monkeypatch, value, captured)["LOGGING"]
    console = logging_conf["handlers"]["console"]
    assert console["formatter"] == chosen
    assert console["filters"] == ["mask_secrets"]  # in either format
    assert logging_conf["root"]["handlers"] == ["console"]
    # JSON: Python's warnings go through logging too (text leaves them as Python prints them).
    assert captured == ([True] if chosen == "json" else [])


def test_an_unknown_log_format_is_refused_at_start(monkeypatch):
    with pytest.raises(ImproperlyConfigured, match="MAILROOM_LOG_FORMAT must be text or json"):
        settings_with(monkeypatch, "xml")


def test_publish_log_fields_name_the_queue_only_when_the_default_exchange_routes_to_it():
    direct = SimpleNamespace(message_id="m-1", exchange="", routing_key="orders")
    routed = SimpleNamespace(message_id="m-2", exchange="events", routing_key="orders.created")
    assert log_fields(direct) == {"message_id": "m-1", "queue": "orders"}
    assert log_fields(routed) == {"message_id": "m-2"}
