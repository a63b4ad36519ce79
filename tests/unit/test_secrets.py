"""messaging.logging: URL passwords masked in log records, error pages and settings."""
from __future__ import annotations

import logging
import sys

from django.utils.functional import SimpleLazyObject

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


# Passwords as they are really written: pika accepts an unencoded `@` (the last `@` before the host
# ends the userinfo), spaces, commas and `%`-escapes.
HARD_PASSWORDS = ["Br@kerPw", "two words", "p%40ss%2Fw", "a,b;c", "@lead and trail@", "it's", "x:y:z"]


def test_mask_credentials_hides_passwords_however_they_are_written():
    for password in HARD_PASSWORDS:
        for url, masked in [
            (f"amqp://user:{password}@host/", "amqp://user:***@host/"),
            (f"amqps://user:{password}@mq.example:5671/%2F", "amqps://user:***@mq.example:5671/%2F"),
            (f"postgres://mailroom:{password}@db:5432/mailroom", "postgres://mailroom:***@db:5432/mailroom"),
            (f"amqp://user:{password}@[::1]:5672", "amqp://user:***@[::1]:5672"),
            (f"amqp://user:{password}@host", "amqp://user:***@host"),
        ]:
            assert mask_credentials(url) == masked, url
            assert mask_credentials(f"connecting to {url} (attempt 2)") == f"connecting to {masked} (attempt 2)"
            shown = mask_credentials(repr({"RABBITMQ_URL": url, "OTHER": "x@y"}))
            assert password not in shown, shown
            if "'" not in password:  # a quote in the password: the rest of the repr is masked too
                assert shown == repr({"RABBITMQ_URL": masked, "OTHER": "x@y"}), shown


def test_mask_credentials_agrees_with_pika_on_where_the_password_ends():
    import pika

    url = "amqp://user:Br@kerPw@host/"
    params = pika.URLParameters(url)
    assert (params.credentials.password, params.host) == ("Br@kerPw", "host")
    assert mask_credentials(url) == "amqp://user:***@host/"


def test_mask_credentials_masks_each_url_of_a_list():
    cluster = ",".join(f"amqp://user:{p}@node-{i}:5672" for i, p in enumerate(HARD_PASSWORDS))
    masked = mask_credentials(cluster)
    assert masked == ",".join(f"amqp://user:***@node-{i}:5672" for i in range(len(HARD_PASSWORDS)))
    with_paths = "amqp://a:Br@k@h1/%2F,amqp://b:two words@h2/vh"
    assert mask_credentials(with_paths) == "amqp://a:***@h1/%2F,amqp://b:***@h2/vh"


def test_mask_credentials_keeps_a_url_with_an_empty_user_or_password_masked():
    assert mask_credentials("amqp://:pw@h/") == "amqp://:***@h/"
    assert mask_credentials("amqp://u:@h/") == "amqp://u:***@h/"


def test_mask_credentials_stays_linear_on_long_text():
    import time

    started = time.monotonic()
    for text in ("amqp://u:" + "x" * 200_000, "x" * 1_000_000, "amqp://u:" + "@a " * 50_000):
        mask_credentials(text)
    assert time.monotonic() - started < 2


def test_settings_whose_names_say_secret_are_hidden_and_urls_masked_inside_structures():
    reporter = SecretsExceptionReporterFilter()
    hidden = reporter.cleansed_substitute
    for name in ("SECRET_KEY", "DB_PASSWORD", "MAILROOM_METRICS_TOKEN", "STRIPE_API_KEY", "PASS"):
        assert reporter.cleanse_setting(name, "anything") == hidden
    databases = {"default": {"PASSWORD": "pw", "NAME": "mailroom", "HOST": "db"}}
    assert reporter.cleanse_setting("DATABASES", databases)["default"] == {"PASSWORD": hidden, "NAME": "mailroom",
                                                                          "HOST": "db"}
    lazy = SimpleLazyObject(lambda: "amqp://u:Br@kerPw@h/")  # as django-axes sets some of its settings
    assert reporter.cleanse_setting("AXES_SOMETHING", lazy) == "amqp://u:***@h/"
    nodes = [f"amqp://u:{p}@h/" for p in HARD_PASSWORDS]
    assert reporter.cleanse_setting("BROKERS", nodes) == ["amqp://u:***@h/"] * len(HARD_PASSWORDS)


def test_safe_repr_never_evaluates_a_queryset_and_never_raises():
    from django.contrib.auth.models import User

    from messaging.logging import safe_repr

    assert safe_repr(User.objects.filter(username="x")) == "<QuerySet (not evaluated)>"  # no database here

    class Exploding:
        def __repr__(self):
            raise RuntimeError("amqp://u:Br@kerPw@h/")

    assert safe_repr(Exploding()) == "<Exploding (repr failed: RuntimeError)>"
    assert safe_repr(["amqp://u:two words@h/"]) == "['amqp://u:***@h/']"


def test_the_error_page_filter_shows_frame_variables_masked_and_safe():
    from django.contrib.auth.models import User

    def frame_with_secrets():
        url = "amqp://u:Br@kerPw@h/"  # noqa: F841 - read from the frame below
        letters = User.objects.all()  # noqa: F841
        return sys._getframe()

    variables = dict(SecretsExceptionReporterFilter().get_traceback_frame_variables(None, frame_with_secrets()))
    assert repr(variables["url"]) == "'amqp://u:***@h/'"
    assert repr(variables["letters"]) == "<QuerySet (not evaluated)>"
