"""API tokens expire, are revoked by an admin or by their user's new password, and note their use once a minute."""
from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from http import HTTPStatus

import pytest
from django.contrib.admin import helpers
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging.models import ApiToken
from messaging.web.api import create_token
from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    """A cheap hasher: these tests change passwords, they do not measure hashing."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def reader() -> User:
    user = User.objects.create_user("reader", password="first-Pw-8d2c")
    user.user_permissions.add(Permission.objects.get(codename="view_message"))
    return user


def read(key: str):
    return Client().get("/api/messages/", HTTP_AUTHORIZATION=f"Bearer {key}")


def assert_refused(response, detail: str) -> None:
    assert response.status_code == HTTPStatus.UNAUTHORIZED
    assert response["WWW-Authenticate"] == 'Bearer realm="mailroom"'
    assert response.json() == {"detail": detail, "code": "authentication_failed"}


def test_a_token_works_until_it_expires(reader):
    token, key = create_token(user=reader, name="billing", expires_at=timezone.now() + timedelta(hours=1))
    assert read(key).status_code == HTTPStatus.OK
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert_refused(read(key), "This API token has expired.")


def test_a_new_password_revokes_the_users_tokens_and_only_theirs(reader):
    _, old_key = create_token(user=reader, name="billing")
    other = User.objects.create_user("other", password="other-Pw-1a2b")
    other.user_permissions.add(Permission.objects.get(codename="view_message"))
    _, other_key = create_token(user=other, name="reports")
    reader.set_password("second-Pw-5e7f")
    reader.save()
    assert_refused(read(old_key), "This API token was revoked: its user's password changed.")
    assert read(other_key).status_code == HTTPStatus.OK
    _, new_key = create_token(user=reader, name="billing again")  # made after the change: bound to the new password
    assert read(new_key).status_code == HTTPStatus.OK


def test_a_deactivated_users_token_is_refused_as_unknown(reader):
    _, key = create_token(user=reader, name="billing")
    reader.is_active = False
    reader.save()
    assert_refused(read(key), "Invalid or unknown API token.")
    assert_refused(read("mr_never-issued"), "Invalid or unknown API token.")


def test_an_admin_revokes_tokens_which_stay_listed(reader):
    token, key = create_token(user=reader, name="billing")
    _, kept_key = create_token(user=reader, name="reports")
    admin = Client()
    admin.force_login(User.objects.create_superuser("admin", password="admin-Pw-0c3d"))
    action = {"action": "revoke", helpers.ACTION_CHECKBOX_NAME: [str(token.pk)]}
    confirm = admin.post("/admin/messaging/apitoken/", action)
    assert confirm.status_code == HTTPStatus.OK and b"Revoke these 1 token(s)?" in confirm.content
    assert ApiToken.objects.get(pk=token.pk).revoked_at is None  # asked, not done
    done = admin.post("/admin/messaging/apitoken/", {**action, "confirmed": "yes"}, follow=True)
    assert b"Revoked 1 token(s)" in done.content
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    assert_refused(read(key), "This API token was revoked.")
    assert read(kept_key).status_code == HTTPStatus.OK

    listing = admin.get("/admin/messaging/apitoken/", {"state": "revoked"}).content.decode()
    assert "billing" in listing and "reports" not in listing  # the audit trail keeps it
    again = admin.post("/admin/messaging/apitoken/", {**action, "confirmed": "yes"}, follow=True)
    assert b"Revoked 0 token(s); 1 were revoked already." in again.content


def test_last_used_is_written_at_most_once_a_minute(reader):
    token, key = create_token(user=reader, name="billing")
    assert read(key).status_code == HTTPStatus.OK
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    assert first is not None
    with CaptureQueriesContext(connection) as queries:
        assert read(key).status_code == HTTPStatus.OK
    assert not [q for q in queries.captured_queries if q["sql"].upper().startswith("UPDATE")]
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    assert read(key).status_code == HTTPStatus.OK
    assert ApiToken.objects.get(pk=token.pk).last_used_at > first


def create_api_token(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), "create_api_token", *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)


@pytest.mark.django_db(transaction=True)
def test_create_api_token_expires_in(reader):
    made = create_api_token("reader", "--name", "monthly", "--expires-in", "30d")
    assert made.returncode == 0, made.stderr
    token = ApiToken.objects.get(name="monthly")
    assert abs(token.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)
    assert read(made.stdout.strip()).status_code == HTTPStatus.OK
    for bad in ("30x", "0d", "soon", "-1d"):
        refused = create_api_token("reader", "--name", f"bad {bad}", f"--expires-in={bad}")
        assert refused.returncode == 1 and "--expires-in takes a number and a unit" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    assert not ApiToken.objects.filter(name__startswith="bad").exists()


@pytest.mark.django_db(transaction=True)
def test_the_migration_binds_existing_tokens_to_the_current_password(reader):
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    # Found by its name's end, so that renumbering the migration leaves this test as it is.
    [after] = [key for key in executor.loader.graph.nodes if key[1].endswith("_apitoken_expiry")]
    [before] = executor.loader.graph.node_map[after].parents
    before = before.key
    executor.migrate([before])
    try:
        old_token = executor.loader.project_state([before]).apps.get_model("messaging", "ApiToken")
        old_token.objects.create(user_id=reader.pk, name="made before", key_sha256="0" * 64)
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    token = ApiToken.objects.get(name="made before")
    assert token.password_sha256 == ApiToken.password_fingerprint(reader) and token.state() == "active"
    reader.set_password("second-Pw-5e7f")
    reader.save()
    token.refresh_from_db()
    assert token.state() == "password changed"
    assert after in MigrationExecutor(connection).loader.applied_migrations
