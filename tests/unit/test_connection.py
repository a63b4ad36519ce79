"""messaging.amqp.connection: parameters from RABBITMQ_URL, and pika's errors translated (no broker: the
errors are made here, and a connection is tried only to a port where nothing listens)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pika
import pika.exceptions as pe
import pytest

from messaging.amqp.connection import (
    broker_urls,
    connect,
    connection_parameters,
    declare_exchange,
    declare_queue,
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


# --- declarations: one place chooses a queue's arguments ---------------------------------------------
class FakeChannel:
    """Notes each declaration; refuses the first active one with a 406 saying `refuse`, when given."""

    def __init__(self, refuse: str = "") -> None:
        self.declared: list[dict] = []
        self.refuse = refuse

    def queue_declare(self, queue, passive=False, **kwargs):
        self.declared.append({"queue": queue, "passive": passive, **kwargs})
        if self.refuse and not passive:
            raise pe.ChannelClosedByBroker(406, self.refuse)
        return SimpleNamespace(method=SimpleNamespace(queue=queue or "amq.gen-x", message_count=0, consumer_count=0))

    def exchange_declare(self, exchange, passive=False, **kwargs):
        self.declared.append({"exchange": exchange, "passive": passive, **kwargs})
        if self.refuse and not passive:
            raise pe.ChannelClosedByBroker(406, self.refuse)


class FakeConnection:
    def __init__(self) -> None:
        self.opened = FakeChannel()

    def channel(self):
        return self.opened


@pytest.mark.parametrize("kwargs, setting, durable, arguments", [
    ({}, False, False, None),  # as the tutorials declare `hello`
    ({}, True, True, None),  # MAILROOM_DURABLE in production
    ({"durable": True}, False, True, None),  # consume --durable
    ({"durable": False}, True, False, None),  # consume --no-durable
    ({"queue_type": "quorum"}, False, True, {"x-queue-type": "quorum"}),  # quorum queues are always durable
    ({"dead_letter_exchange": "dlx"}, False, False, {"x-dead-letter-exchange": "dlx"}),
])
def test_declare_queue_chooses_durability_and_arguments(settings, kwargs, setting, durable, arguments):
    settings.MAILROOM_DURABLE = setting
    channel = FakeChannel()
    _, state = declare_queue(FakeConnection(), channel, "hello", **kwargs)
    assert channel.declared == [{"queue": "hello", "passive": False, "durable": durable, "exclusive": False,
                                 "auto_delete": False, "arguments": arguments}]
    assert state.survives_restart is durable


def test_a_server_named_queue_is_exclusive_and_never_durable(settings):
    settings.MAILROOM_DURABLE = True
    channel = FakeChannel()
    _, state = declare_queue(FakeConnection(), channel, "", exclusive=True)
    assert channel.declared[0] | {"arguments": None} == {
        "queue": "", "passive": False, "durable": False, "exclusive": True, "auto_delete": True, "arguments": None}
    assert state.name == "amq.gen-x" and not state.survives_restart


@pytest.mark.parametrize("durable, refusal, survives", [
    (False, "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'false' but current is 'true'", True),
    (True, "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'", False),
    (False, "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue 'q' in vhost '/': received 'false' but current is 'true'", False),
    (True, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received none but current is the value 'quorum'", True),
])
def test_an_existing_queue_is_used_as_it_is_and_its_durability_told(durable, refusal, survives):
    connection = FakeConnection()
    channel, state = declare_queue(connection, FakeChannel(refuse=refusal), "q", durable=durable)
    assert channel is connection.opened and connection.opened.declared[-1] == {"queue": "q", "passive": True}
    assert state.note == refusal and state.survives_restart is survives
    if "'durable'" in refusal:  # asked again as the queue is, to learn whether its arguments differ too
        assert connection.opened.declared[0]["durable"] is not durable
    else:
        assert len(connection.opened.declared) == 1


@pytest.mark.parametrize("setting, durable", [(False, None), (True, None), (False, True)])
def test_declare_exchange_follows_the_same_rule(settings, setting, durable):
    settings.MAILROOM_DURABLE = setting
    channel = FakeChannel()
    assert declare_exchange(FakeConnection(), channel, "logs", exchange_type="fanout", durable=durable) is channel
    assert channel.declared == [{"exchange": "logs", "passive": False, "exchange_type": "fanout",
                                 "durable": setting if durable is None else durable}]
