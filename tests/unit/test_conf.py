"""messaging.conf: settings with Mailroom's defaults, and the checks that refuse a bad value at start-up."""
from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from messaging import conf
from messaging.conf import CONTEXT_PROCESSOR, DEFAULTS, check_project_urls, check_settings


def ids(errors) -> list[str]:
    return [e.id for e in errors]


def test_get_reads_the_project_setting_at_each_call(settings):
    settings.MAILROOM_PUBLISH_TIMEOUT = 1.25
    assert conf.get("MAILROOM_PUBLISH_TIMEOUT") == 1.25
    settings.MAILROOM_PUBLISH_TIMEOUT = 7
    assert conf.get("MAILROOM_PUBLISH_TIMEOUT") == 7


def test_get_falls_back_to_the_default(settings):
    del settings.MAILROOM_METRICS_TOKEN
    del settings.MAILROOM_MAX_BODY_BYTES
    assert conf.get("MAILROOM_METRICS_TOKEN") == DEFAULTS["MAILROOM_METRICS_TOKEN"] == ""
    assert conf.get("MAILROOM_MAX_BODY_BYTES") == 10 * 1024 * 1024
    with pytest.raises(KeyError):
        conf.get("NOT_A_MAILROOM_SETTING")


def test_the_test_settings_pass_the_checks():
    assert check_settings() == []


@pytest.mark.parametrize("url, ok", [
    ("amqp://guest:guest@mq.example/%2F", True),
    ("amqps://u:p@a.example/%2F, amqp://u:p@b.example/%2F", True),  # a cluster, spaces allowed
    ("http://guest:guest@mq.example/", False),
    ("amqp://a.example/%2F,redis://b.example", False),
    ("mq.example/%2F", False),
])
def test_rabbitmq_url_must_be_amqp_addresses(settings, url, ok):
    settings.RABBITMQ_URL = url
    assert ids(check_settings()) == ([] if ok else ["messaging.E001"])


@pytest.mark.parametrize("name", ["MAILROOM_PUBLISH_TIMEOUT", "MAILROOM_RELAY_GRACE_SECONDS", "MAILROOM_MAX_BODY_BYTES"])
@pytest.mark.parametrize("value", [0, -1, True, "3", None])
def test_durations_and_sizes_must_be_positive_numbers(settings, name, value):
    setattr(settings, name, value)
    errors = check_settings()
    assert ids(errors) == ["messaging.E002"] and name in errors[0].msg


def test_queue_handlers_must_be_a_mapping_of_importable_paths(settings):
    settings.MAILROOM_QUEUE_HANDLERS = ["json.dumps"]
    assert ids(check_settings()) == ["messaging.E003"]
    settings.MAILROOM_QUEUE_HANDLERS = {"ok": "json.dumps", "broken": "messaging.no_such_module.handle"}
    errors = check_settings()
    assert ids(errors) == ["messaging.E004"] and "'broken'" in errors[0].msg and "no_such_module" in errors[0].msg


class PagesAlone:
    """A project that includes Mailroom's pages but neither the admin nor auth's views."""

    urlpatterns = (path("mailroom/", include("messaging.web.urls")),)


class PagesWithLogin:
    urlpatterns = (
        path("admin/", admin.site.urls),
        path("login/", auth_views.LoginView.as_view(), name="login"),
        path("mailroom/", include("messaging.web.urls")),
    )


class NoPages:
    """A project that uses Mailroom's models, admin and commands, not its pages."""

    urlpatterns = (path("admin/", admin.site.urls),)


def test_the_test_settings_pass_the_url_checks():
    assert check_project_urls() == []


def test_pages_need_the_projects_login_logout_and_admin(settings):
    settings.ROOT_URLCONF = PagesAlone
    warnings = check_project_urls()
    assert ids(warnings) == ["messaging.W001"] * 3
    assert ["'login'" in w.msg for w in warnings] == [True, False, False]
    settings.ROOT_URLCONF = PagesWithLogin
    warnings = check_project_urls()
    assert ids(warnings) == ["messaging.W001"] and "'logout'" in warnings[0].msg


def test_a_project_without_the_pages_needs_nothing_for_them(settings):
    settings.ROOT_URLCONF = NoPages
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "OPTIONS": {"context_processors": []}}]
    assert check_project_urls() == []


def test_pages_want_the_broker_status_context_processor(settings):
    engine = settings.TEMPLATES[0]
    processors = [p for p in engine["OPTIONS"]["context_processors"] if p != CONTEXT_PROCESSOR]
    settings.TEMPLATES = [{**engine, "OPTIONS": {**engine["OPTIONS"], "context_processors": processors}}]
    assert ids(check_project_urls()) == ["messaging.W002"]


@pytest.mark.parametrize("value", ["true", 1, None])
def test_durable_must_be_a_boolean(settings, value):
    settings.MAILROOM_DURABLE = value
    assert ids(check_settings()) == ["messaging.E005"]


def test_durable_defaults_to_the_tutorials_way(settings):
    del settings.MAILROOM_DURABLE
    assert conf.get("MAILROOM_DURABLE") is False
