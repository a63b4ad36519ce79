"""messaging.amqp.connection: parameters from RABBITMQ_URL, and pika's errors translated (no broker: the
errors are made here, and a connection is tried only to a port where nothing listens)."""
from __future__ import annotations

import time

import pika
import pika.exceptions as pe
import pytest

from messaging.amqp.connection import (
    broker_urls,
    connect,
    connection_parameters,
    describe,
    handshake_error,
    translated,
)
from messaging.errors import ConnectionLost, FatalBrokerError

CLOSED = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens on port 1


def test_broker_urls_splits_a_cluster_in_order():
    assert broker_urls(" amqp://a/%2F , ,amqps://b:5671/vh,") == ["amqp://a/%2F", "amqps://b:5671/vh"]


def test_broker_urls_reads_the_setting_when_not_given(settings):
    settings.RABBITMQ_URL = "amqp://one.example/%2F,amqp://two.example/%2F"
    assert broker_urls() == ["amqp://one.example/%2F", "amqp://two.example/%2F"]


def test_connection_parameters_for_each_address():
    first, second = connection_parameters(url="amqp://u:p@one.example:5999/v1,amqps://u:p@two.example/%2F",
                                          heartbeat=15, timeout=2.5, client_name="mailroom-test")
    assert (first.host, first.port, first.virtual_host) == ("one.example", 5999, "v1")
    assert (second.host, second.port, second.virtual_host, second.ssl_options is not None) == (
        "two.example", 5671, "/", True)
    for p in (first, second):
        assert p.heartbeat == 15
        assert (p.socket_timeout, p.stack_timeout, p.blocked_connection_timeout) == (2.5, 5.0, 2.5)
        assert p.client_properties == {"connection_name": "mailroom-test"}
        assert p.credentials.username == "u" and p.credentials.password == "p"


def test_connection_parameters_keep_pikas_defaults_when_not_told():
    (p,) = connection_parameters(url="amqp://h.example/%2F")
    default = pika.URLParameters("amqp://h.example/%2F")
    assert (p.heartbeat, p.socket_timeout, p.blocked_connection_timeout) == (
        default.heartbeat, default.socket_timeout, default.blocked_connection_timeout)
    assert p.client_properties == {"connection_name": "mailroom"}


def test_connect_to_a_closed_port_is_a_lost_connection_not_a_fatal_one():
    started = time.monotonic()
    with pytest.raises(ConnectionLost) as lost:
        connect(url=CLOSED, timeout=2)
    assert not isinstance(lost.value, FatalBrokerError) and "guest" not in str(lost.value)
    assert time.monotonic() - started < 10


def cut_short():
    return pe.ProbableAuthenticationError(repr(pe.StreamLostError("Transport indicated EOF")))


def test_a_handshake_failure_before_the_first_login_is_fatal():
    for exc in (cut_short(), pe.ProbableAccessDeniedError("(320, 'CONNECTION_FORCED')"),
                pe.AuthenticationError("PLAIN")):
        error = handshake_error(exc, logged_in_before=False)
        assert isinstance(error, FatalBrokerError) and "refused the login" in str(error)


def test_once_logged_in_only_an_explicit_refusal_is_fatal():
    assert isinstance(handshake_error(cut_short(), logged_in_before=True), ConnectionLost)
    forced = pe.ProbableAccessDeniedError(repr(pe.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown")))
    assert isinstance(handshake_error(forced, logged_in_before=True), ConnectionLost)
    for refused in (
        pe.ProbableAuthenticationError(repr(pe.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused"))),
        pe.ProbableAccessDeniedError(repr(pe.ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost nope not found"))),
        pe.AuthenticationError("PLAIN"),
    ):
        assert isinstance(handshake_error(refused, logged_in_before=True), FatalBrokerError), refused


def test_describe_gives_short_texts():
    assert describe(pe.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown")) == \
        "ConnectionClosedByBroker: 320 CONNECTION_FORCED - shutdown"
    assert describe(pe.ChannelClosedByBroker(404, "NOT_FOUND - no exchange 'x'")) == \
        "ChannelClosedByBroker: 404 NOT_FOUND - no exchange 'x'"
    assert describe(pe.ConnectionBlockedTimeout()).startswith("broker blocked")
    assert describe(pe.AMQPConnectionError()) == "AMQPConnectionError: the broker did not answer"
    assert describe(pe.StreamLostError("Transport indicated EOF")) == "StreamLostError: Transport indicated EOF"


@pytest.mark.parametrize("raised, expected, code", [
    (pe.ChannelClosedByBroker(403, "ACCESS_REFUSED"), FatalBrokerError, None),
    (pe.ConnectionClosedByBroker(530, "NOT_ALLOWED"), FatalBrokerError, None),
    (pe.ChannelClosedByBroker(404, "NOT_FOUND"), ConnectionLost, 404),
    (pe.ConnectionClosedByBroker(320, "CONNECTION_FORCED"), ConnectionLost, 320),
    (pe.StreamLostError("EOF"), ConnectionLost, None),
    (pe.ChannelWrongStateError("closed"), ConnectionLost, None),
    (ConnectionResetError("reset"), ConnectionLost, None),
])
def test_translated_turns_pika_errors_into_mailroom_errors(raised, expected, code):
    with pytest.raises(expected) as caught, translated():
        raise raised
    assert type(caught.value) is expected and caught.value.__cause__ is raised
    if expected is ConnectionLost:
        assert caught.value.reply_code == code


def test_translated_lets_other_errors_through():
    with pytest.raises(KeyError), translated():
        raise KeyError("not pika's")
