"""The unit tier: no broker, no database server. tests/conftest.py marks every test here `unit`."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    """Users made here get a cheap hash: PBKDF2 costs up to a second per user, and this tier is for seconds."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
