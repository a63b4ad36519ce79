"""django-axes throttles both login pages: ten failures for a username or from an address lock it for the cool-off."""
from __future__ import annotations

from http import HTTPStatus

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

from config.auth import client_address

pytestmark = pytest.mark.django_db

LOGIN_PAGES = ["/accounts/login/", "/admin/login/"]
PASSWORD = "right-Pw-3c9e1a"
LIMIT = 10


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    """A cheap hasher: the tests count refused logins, not the cost of checking a password."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff():
    return User.objects.create_user("operator", password=PASSWORD, is_staff=True, is_superuser=True)


def log_in(client: Client, page: str, username: str, password: str, address: str = "203.0.113.7"):
    return client.post(page, {"username": username, "password": password}, REMOTE_ADDR=address)


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def assert_locked_out(response) -> None:
    assert response.status_code == HTTPStatus.TOO_MANY_REQUESTS
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "Too many login attempts" in page and "try again in\n  15 minutes" in page
    assert "operator" not in page and "nobody-" not in page  # never says which user, or whether one exists


@pytest.mark.parametrize("page", LOGIN_PAGES)
def test_the_eleventh_attempt_is_refused_even_with_the_right_password(client, staff, page):
    for attempt in range(1, LIMIT):
        response = log_in(client, page, "operator", f"wrong-{attempt}")
        assert response.status_code == HTTPStatus.OK, attempt  # the form again, with its error
    assert_locked_out(log_in(client, page, "operator", "wrong-10"))
    assert_locked_out(log_in(client, page, "operator", PASSWORD))
    assert not logged_in(client)
    # From another address too: the username is locked on its own.
    assert_locked_out(log_in(Client(), page, "operator", PASSWORD, address="198.51.100.4"))


@pytest.mark.parametrize("page", LOGIN_PAGES)
def test_an_address_is_locked_out_across_usernames(client, staff, page):
    for attempt in range(LIMIT):
        log_in(client, page, f"nobody-{attempt}", "guess")
    assert_locked_out(log_in(client, page, "operator", PASSWORD))
    assert not logged_in(client)
    other = Client()
    assert log_in(other, page, "operator", PASSWORD, address="198.51.100.4").status_code == HTTPStatus.FOUND
    assert logged_in(other)


def test_a_locked_out_user_that_does_not_exist_gets_the_same_page(client, staff):
    pages = []
    for username in ("operator", "nobody-at-all"):
        for attempt in range(LIMIT):
            log_in(Client(), "/accounts/login/", username, "guess", address=f"192.0.2.{attempt}")
        response = log_in(Client(), "/accounts/login/", username, "guess", address="192.0.2.200")
        assert_locked_out(response)
        pages.append(response.content.decode().replace(username, "USERNAME"))
    assert pages[0] == pages[1]


def test_the_lockout_shows_in_the_admin_and_axes_reset_lifts_it(client, staff):
    for attempt in range(LIMIT):
        log_in(client, "/admin/login/", "operator", f"wrong-{attempt}")
    admin = Client()
    admin.force_login(User.objects.create_user("auditor", is_staff=True, is_superuser=True))
    listing = admin.get("/admin/axes/accessattempt/")
    assert listing.status_code == HTTPStatus.OK
    assert "operator" in listing.content.decode() and "203.0.113.7" in listing.content.decode()

    call_command("axes_reset")
    response = log_in(client, "/admin/login/", "operator", PASSWORD)
    assert response.status_code == HTTPStatus.FOUND and logged_in(client)


def test_behind_a_proxy_the_address_is_the_proxys_entry(rf, settings):
    forged = rf.get("/", HTTP_X_FORWARDED_FOR="10.9.9.9, 203.0.113.7", REMOTE_ADDR="127.0.0.1")
    assert client_address(forged) == "127.0.0.1"  # no proxy declared: the header is the client's word
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert client_address(forged) == "203.0.113.7"  # the entry our proxy appended, not the forged first one
    assert client_address(rf.get("/", REMOTE_ADDR="127.0.0.1")) == "127.0.0.1"
