"""messaging.errors: one hierarchy, whose branches the callers rely on."""
from __future__ import annotations

import inspect

from messaging import errors
from messaging.errors import (
    BrokerBlocked,
    BrokerError,
    ChannelLost,
    ConfirmTimeout,
    ConnectionLost,
    FatalBrokerError,
    FrameTooLarge,
    InvalidMessage,
    MailroomError,
    PublishRefused,
    QueueGone,
    Unroutable,
)


def test_every_error_is_a_mailroom_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 12
    assert all(issubclass(c, MailroomError) for c in classes)


def test_an_invalid_message_is_a_value_error_and_a_too_large_frame_is_an_invalid_message():
    assert issubclass(InvalidMessage, ValueError)
    assert issubclass(FrameTooLarge, InvalidMessage)
    try:
        raise FrameTooLarge("too big")
    except ValueError as exc:  # callers that catch ValueError (forms, the API) catch it
        assert str(exc) == "too big"


def test_what_leaves_a_letter_pending_is_a_broker_error_and_what_settles_it_is_not():
    assert issubclass(BrokerBlocked, BrokerError) and issubclass(ConfirmTimeout, BrokerError)
    for final in (PublishRefused, Unroutable, FatalBrokerError, InvalidMessage):
        assert not issubclass(final, BrokerError), final
    assert not issubclass(FatalBrokerError, ConnectionLost)  # never retried as a lost connection


def test_a_lost_connection_carries_the_brokers_reply_code():
    assert ConnectionLost("gone").reply_code is None
    lost = QueueGone("queue deleted", reply_code=404)
    assert isinstance(lost, ConnectionLost) and lost.reply_code == 404 and str(lost) == "queue deleted"
    assert issubclass(ChannelLost, ConnectionLost) and ChannelLost("x", reply_code=406).reply_code == 406
