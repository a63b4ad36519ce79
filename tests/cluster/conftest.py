"""Fixtures of the cluster tests (marker `cluster`): a three-node RabbitMQ cluster for the session,
started by scripts/cluster.sh on ports of its own and removed afterwards.

These tests run on PostgreSQL only (the deployment they prove has one shared PostgreSQL); on SQLite
they are skipped before the cluster is started. `make cluster-test` runs them alone.

The cluster's ports: MAILROOM_CLUSTER_TEST_BASE_PORT (5690: AMQP 5691-5693, management
15691-15693, distribution 25691-25693), apart from `scripts/cluster.sh up`'s defaults so that a
cluster someone started by hand is left alone.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings

from tests.cluster.harness import Cluster

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip this folder's tests on SQLite (before any fixture starts the cluster)."""
    if "postgresql" in settings.DATABASES["default"]["ENGINE"]:
        return
    skip = pytest.mark.skip(reason="cluster tests run on PostgreSQL (DATABASE_URL=postgres://...)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster():
    """The three nodes, up for the whole session; everything scripts/cluster.sh made is removed after."""
    base = os.environ.get("MAILROOM_CLUSTER_TEST_BASE_PORT", "5690")
    nodes = Cluster(env={
        "MAILROOM_CLUSTER_BASE_PORT": base,
        "MAILROOM_CLUSTER_DIR": f"/tmp/mailroom-cluster-test-{base}",
        "MAILROOM_CLUSTER_PREFIX": "mailroom-test",
    })
    try:
        nodes.up()
        yield nodes
    finally:
        nodes.script("down")


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """The test's environment (and so its subprocesses') points at the cluster; every node is
    running, healed and without alarms after the test, whatever it left behind."""
    for name, value in cluster.variables.items():
        monkeypatch.setenv(name, value)
    yield cluster
    cluster.restore()
