"""Mailroom's exceptions: one hierarchy; pika's errors are translated into these in `messaging.amqp`."""
from __future__ import annotations


class MailroomError(Exception):
    """Base class for every error Mailroom raises on purpose."""


class InvalidMessage(MailroomError, ValueError):
    """The message cannot be published as given; the text is a clear sentence for the user."""


class DuplicateMessageId(InvalidMessage):
    """Another message already has this message_id (the unique constraint decided)."""


class FrameTooLarge(InvalidMessage):
    """The message's properties do not fit in one AMQP frame of the connection's frame_max."""


class BrokerError(MailroomError):
    """Publishing got no confirm (broker down, nack, lost connection): the message stays pending."""


class BrokerBlocked(BrokerError):
    """The broker blocked the connection (a memory or disk alarm)."""


class ConfirmTimeout(BrokerError):
    """No answer from the broker in time (a stuck queue, a quorum queue without its majority)."""


class PublishRefused(MailroomError):
    """The broker refused this message for good (no such exchange, access refused, too large)."""


class Unroutable(MailroomError):
    """The broker returned the message: no queue is bound for its routing key."""


class FatalBrokerError(MailroomError):
    """Retrying cannot help: wrong credentials, a missing vhost or missing permissions."""

    hint = "check RABBITMQ_URL's user, password and vhost"  # what the operator should do, for the log


class QueueMismatch(FatalBrokerError):
    """A queue exists with other arguments than those a feature needs (the broker refuses to change them)."""

    hint = "delete the queue, or consume it without the options that need those arguments"


class NoSuchQueue(MailroomError):
    """The queue named does not exist (the broker answered 404 to a passive declare)."""


class NotAStream(FatalBrokerError):
    """A queue to read as a stream (`consume --queue-type stream`) exists as another type."""

    hint = "consume it without --queue-type stream, or tap a stream of another name"


class ManagementUnavailable(MailroomError):
    """The RabbitMQ management API is not configured or does not answer (the sentence says which)."""


class ManagementRefused(MailroomError):
    """The management API refused the request (a stream queue cannot be peeked, say); the text is its reason."""


class NotMigrated(MailroomError):
    """The database answers but lacks Mailroom's tables: `python manage.py migrate` has not been run."""


class ConnectionLost(MailroomError):
    """The connection or channel to the broker is gone; connect again (`reply_code` when the broker said why)."""

    def __init__(self, text: str, *, reply_code: int | None = None) -> None:
        super().__init__(text)
        self.reply_code = reply_code


class QueueGone(ConnectionLost):
    """The broker cancelled a consumer (its queue was deleted)."""


class ChannelLost(ConnectionLost):
    """The broker closed the channel (and with it the consumers) but not the connection."""
