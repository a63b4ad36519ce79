"""The one place Mailroom uses pika's private attributes: `messaging.amqp.connection.drop_after`.

It reaches a `BlockingConnection`'s `_impl` (the SelectConnection underneath), that connection's
`_blocked_conn_timer` (pika's own blocked-connection timeout, running or None) and its
`_terminate_stream(error)` (drop the connection without a closing handshake), and schedules on
its `ioloop`. If a pika upgrade renames any of them, these fail here, loudly, instead of the
publisher's deadline silently never firing in production.
"""
from __future__ import annotations

import inspect

import pika
import pytest
from pika import connection as pika_connection
from pika.adapters import blocking_connection, select_connection

from messaging.amqp.connection import drop_after

SEAM = "pika changed a private attribute messaging.amqp.connection.drop_after relies on: adapt drop_after"


def test_blocking_connection_keeps_its_implementation_in_impl():
    source = inspect.getsource(blocking_connection.BlockingConnection.__init__)
    assert "self._impl = " in source, SEAM
    assert "_impl" in inspect.getsource(blocking_connection.BlockingConnection.process_data_events), SEAM


def test_the_connection_has_terminate_stream_and_the_blocked_timer():
    terminate = getattr(pika_connection.Connection, "_terminate_stream", None)
    assert callable(terminate), SEAM
    assert list(inspect.signature(terminate).parameters) == ["self", "error"], SEAM
    source = inspect.getsource(pika_connection.Connection)
    assert "self._blocked_conn_timer = None" in source, SEAM  # reset when the connection is unblocked
    assert "_on_blocked_connection_timeout" in source, SEAM  # pika's own timeout, which drop_after defers to


@pytest.fixture
def impl():
    """A SelectConnection that never connects, on an I/O loop of its own."""
    loop = select_connection.IOLoop()
    conn = select_connection.SelectConnection(
        pika.URLParameters("amqp://guest:guest@127.0.0.1:1/%2F"), custom_ioloop=loop,
        internal_connection_workflow=False,
    )
    yield conn
    loop.close()


class Blocking:
    """What drop_after reads of a BlockingConnection."""

    def __init__(self, impl) -> None:
        self._impl = impl


def run_loop(impl, seconds: float = 0.2) -> None:
    impl.ioloop.call_later(seconds, impl.ioloop.stop)
    impl.ioloop.start()


def test_an_instance_has_the_attributes(impl):
    assert hasattr(impl, "_blocked_conn_timer") and impl._blocked_conn_timer is None, SEAM
    assert callable(impl.ioloop.call_later) and callable(impl.ioloop.remove_timeout), SEAM


def test_drop_after_drops_the_connection_with_the_error_unless_cancelled(impl, monkeypatch):
    dropped = []
    monkeypatch.setattr(impl, "_terminate_stream", dropped.append)
    error = RuntimeError("no answer from the broker within 1s")
    drop_after(Blocking(impl), 0.01, error)
    cancel = drop_after(Blocking(impl), 0.01, RuntimeError("answered in time"))
    cancel()
    run_loop(impl)
    assert dropped == [error]


def test_drop_after_leaves_a_blocked_connection_to_pikas_own_timeout(impl, monkeypatch):
    dropped = []
    monkeypatch.setattr(impl, "_terminate_stream", dropped.append)
    impl._blocked_conn_timer = object()  # pika's blocked-connection timeout is running
    drop_after(Blocking(impl), 0.01, RuntimeError("no answer"))
    run_loop(impl)
    assert dropped == []
