"""The live API against its own OpenAPI schema (schemathesis): every answer documented, none a 5xx.

Its POSTs really go through the outbox, confined to a routing key of this run's own on the default
exchange with nothing declared: the broker returns them (unroutable) and no queue or exchange is made.
"""
from __future__ import annotations

import uuid

import pytest
import schemathesis
from django.contrib.auth.models import Permission, User
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from messaging.models import Delivery, Message
from messaging.web.api import create_token
from messaging.web.api.serializers import MESSAGE_FIELDS as FIELDS
from tests.conftest import management_url

pytestmark = pytest.mark.django_db(transaction=True)  # the publish step follows the view's real commit

ROUTING_KEY = f"t-schemathesis-{uuid.uuid4().hex[:8]}"  # no queue has this name: every publish is returned
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture
def bearer(settings):
    """The Authorization header of a user who may publish and read letters."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.RABBITMQ_MANAGEMENT_URL = management_url()  # the dead-letter reads answer 503 without it
    user = User.objects.create_user(f"schemathesis-{uuid.uuid4().hex[:6]}", password="pw-for-tests")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_message", "view_message"]))
    return {"Authorization": f"Bearer {create_token(user=user, name='schemathesis')[1]}"}


def api_schema():
    """The schema as the app serves it (public: no database read), its requests sent to the app in-process (WSGI)."""
    from config.wsgi import application

    loaded = schemathesis.openapi.from_wsgi("/api/openapi.json", application)
    # Valid requests only: invalid ones are the 400 tests' business, and each example here may publish.
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE], database="none")
    return loaded


schema = api_schema()


@pytest.fixture
def known_letter() -> str:
    """The message_id of a letter with a delivery, for the reads that should find one."""
    message = Message(message_id=f"schemathesis-{uuid.uuid4().hex[:8]}", routing_key=ROUTING_KEY)
    message.set_body(b"known")
    message.save()
    Delivery.objects.create(message=message, queue=ROUTING_KEY, delivery_tag=1)
    return message.message_id


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_the_api_answers_as_its_schema_says(case, bearer, known_letter):
    if case.method == "POST" and isinstance(case.body, dict):
        case.body = {k: v for k, v in case.body.items() if k in FIELDS}  # the schema says: no other fields
        case.body.pop("body_base64" if "body" in case.body else "", None)  # either one, not both
        case.body.update(exchange="", routing_key=ROUTING_KEY, declare=False)
        if isinstance(case.body.get("properties"), dict):
            case.body["properties"].pop("user_id", None)  # the broker refuses another user's id: a closed channel
    if "message_id" in (case.path_parameters or {}) and len(case.path_parameters["message_id"]) % 2:
        case.path_parameters["message_id"] = known_letter  # half the reads find a letter
    case.call_and_validate(headers=bearer, checks=CHECKS)
