"""Connections to RabbitMQ: parameters from RABBITMQ_URL, which of its nodes to connect to, connecting,
declarations, and pika's errors translated."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pika
import pika.exceptions as pe

from messaging import conf
from messaging.errors import (
    ConnectionLost,
    FatalBrokerError,
    MailroomError,
    QueueMismatch,
)

logger = logging.getLogger(__name__)

# Errors that mean "the connection is gone, connect again".
CONNECTION_ERRORS = (pe.AMQPConnectionError, pe.ConnectionWrongStateError, pe.ChannelWrongStateError, OSError)
# Every pika error a consumer's connection can raise.
PIKA_ERRORS = (*CONNECTION_ERRORS, pe.AMQPError)
FATAL_REPLY_CODES = {403, 530}  # ACCESS_REFUSED, NOT_ALLOWED (e.g. missing vhost)
HANDSHAKE_ERRORS = (pe.ProbableAuthenticationError, pe.ProbableAccessDeniedError, pe.AuthenticationError)


# --- URLs and connection parameters ---------------------------------------------------------
def broker_urls(url: str | None = None) -> list[str]:
    """The comma-separated broker addresses of RABBITMQ_URL (a cluster), in order."""
    return [part.strip() for part in (url or conf.get("RABBITMQ_URL")).split(",") if part.strip()]


def connection_parameters(
    *, url: str | None = None, heartbeat: int | None = None, timeout: float | None = None,
    client_name: str = "mailroom",
) -> list[pika.URLParameters]:
    """pika parameters for every address in RABBITMQ_URL; `timeout` bounds connecting and blocking."""
    params = []
    for address in broker_urls(url):
        p = pika.URLParameters(address)
        if heartbeat is not None:
            p.heartbeat = heartbeat
        if timeout is not None:
            p.socket_timeout = timeout
            p.stack_timeout = timeout * 2
            p.blocked_connection_timeout = timeout
        p.client_properties = {"connection_name": client_name}
        params.append(p)
    return params


def spread_offset() -> int:
    """This process's place among the others: its pid (processes started one after another take
    the addresses in turn) plus a hash of its host (processes of the same pid in containers differ)."""
    return os.getpid() + zlib.crc32(socket.gethostname().encode())


def address_of(params: pika.ConnectionParameters) -> str:
    """`host:port` of an address: what the logs say a process is connected to (no credentials)."""
    host = params.host if ":" not in params.host else f"[{params.host}]"
    return f"{host}:{params.port}"


class Nodes:
    """Which address of RABBITMQ_URL a long-lived connection tries first, and which it is on.

    One per connection owner, kept across its reconnects. Processes start at different addresses
    (`spread_offset`), so that they spread over a cluster's nodes, and fail over through the rest
    in turn. After connecting to an address, the next connection starts at another one: a
    connection that was lost, most likely with its node, goes straight to a surviving node, and
    the processes of a lost node go to different ones.
    """

    def __init__(self, *, offset: int | None = None) -> None:
        self._offset = spread_offset() if offset is None else offset
        self._next: int | None = None  # the index to try first next time; None: the offset's
        self.current = ""  # `host:port` of the address last connected to

    def order(self, count: int) -> list[int]:
        """The indexes of `count` addresses in the order to try them."""
        start = (self._offset if self._next is None else self._next) % count
        return [(start + i) % count for i in range(count)]

    def connected(self, index: int, addresses: list[pika.ConnectionParameters], *, client_name: str,
                  level: int = logging.INFO) -> None:
        """The connection to `addresses[index]` opened: log the node it is on, and move the next start on."""
        count = len(addresses)
        step = 1 + self._offset % (count - 1) if count > 1 else 0
        self._next = (index + step) % count
        self.current = address_of(addresses[index])
        logger.log(level, "connected to RabbitMQ node=%s address=%s/%s client=%s", self.current, index + 1, count,
                   client_name)


def connect(*, url: str | None = None, heartbeat: int | None = None, timeout: float | None = None,
            client_name: str = "mailroom", logged_in_before: bool = False,
            nodes: Nodes | None = None) -> pika.BlockingConnection:
    """A blocking connection to the first address of RABBITMQ_URL that answers, in `nodes`' order.

    `logged_in_before`: the caller has connected with these settings before (see `handshake_error`).
    `nodes`: a long-lived connection's (see `Nodes`); its connections are logged at INFO, with the
    node; without it (a probe, a page), the order is this process's and the log line DEBUG.
    pika tries a list of addresses itself, but does not tell which one answered: so each is tried
    here in turn, and the last error raised.
    """
    params = connection_parameters(url=url, heartbeat=heartbeat, timeout=timeout, client_name=client_name)
    chosen = nodes or Nodes()
    error: Exception | None = None
    for index in chosen.order(len(params)):
        try:
            connection = pika.BlockingConnection(params[index])
        except CONNECTION_ERRORS as exc:
            logger.debug("broker node=%s did not answer: %s", address_of(params[index]), describe(exc))
            error = exc
            continue
        chosen.connected(index, params, client_name=client_name, level=logging.INFO if nodes else logging.DEBUG)
        return connection
    raise connect_error(error, logged_in_before=logged_in_before) from error


def connect_error(exc: Exception, *, logged_in_before: bool) -> MailroomError:
    """What the last failure to connect means (`FatalBrokerError` or `ConnectionLost`)."""
    if isinstance(exc, HANDSHAKE_ERRORS):
        return handshake_error(exc, logged_in_before=logged_in_before)
    if isinstance(exc, pe.ConnectionClosedByBroker):
        if exc.reply_code in FATAL_REPLY_CODES:
            return FatalBrokerError(f"the broker refused the connection: {exc.reply_code} {exc.reply_text}")
        return ConnectionLost(describe(exc), reply_code=exc.reply_code)
    return ConnectionLost(describe(exc))


def handshake_error(exc: Exception, *, logged_in_before: bool) -> MailroomError:
    """What a connection that failed during its handshake means: a refused login or vhost (fatal),
    or a broker that cut the handshake short (`ConnectionLost`: retry).

    pika calls any connection closed while authenticating a "probable" authentication error, and
    while tuning a "probable" access error. RabbitMQ refuses a login or vhost explicitly (403, 530);
    but it also drops connections still in their handshake when it stops or closes every
    connection, which pika reports the same way. Once the caller has logged in, only an explicit
    refusal is fatal; before that, any such failure is (a misconfiguration is likelier than a
    broker restarting at that very moment, and retrying it would only storm).
    """
    text = str(exc)
    refused = isinstance(exc, pe.AuthenticationError) or any(f"({code})" in text for code in FATAL_REPLY_CODES)
    if refused or not logged_in_before:
        return FatalBrokerError(f"the broker refused the login ({exc.__class__.__name__}: {text})")
    return ConnectionLost(f"the broker closed the connection during its handshake ({text})")


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a pika error for logs and the database."""
    if isinstance(exc, (pe.ConnectionClosedByBroker, pe.ChannelClosedByBroker)):
        return f"{exc.__class__.__name__}: {exc.reply_code} {exc.reply_text}"
    if isinstance(exc, pe.ConnectionBlockedTimeout):
        return "broker blocked: the connection stayed blocked (memory or disk alarm)"
    if isinstance(exc, pe.AMQPConnectionError) and not str(exc):
        return f"{exc.__class__.__name__}: the broker did not answer"
    return f"{exc.__class__.__name__}: {exc}"


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise pika's connection and channel errors as `ConnectionLost` (or `FatalBrokerError` for 403/530)."""
    try:
        yield
    except PIKA_ERRORS as exc:
        code = getattr(exc, "reply_code", None)
        if code in FATAL_REPLY_CODES:
            raise FatalBrokerError(describe(exc)) from exc
        raise ConnectionLost(describe(exc), reply_code=code) from exc


def drop_after(connection: pika.BlockingConnection, seconds: float, error: Exception) -> Callable[[], None]:
    """Drop `connection` with `error` unless the returned function is called within `seconds`.

    pika's blocking calls wait without a limit, and a broker that withholds an answer (a stuck
    queue process, a quorum queue without its majority) still answers heartbeats; pika 1.4's public
    timers fire only in `process_data_events`. So this is a timer of the connection's own I/O loop
    that drops the connection the way pika's blocked-connection timeout does (no closing
    handshake, which a stuck broker may never answer), unless that timeout is already running.
    The one place Mailroom uses pika's private attributes; `tests/unit/test_pika_seam.py` fails
    when pika changes them.
    """
    impl = connection._impl

    def expire() -> None:
        if impl._blocked_conn_timer is None:
            impl._terminate_stream(error)

    timer = impl.ioloop.call_later(seconds, expire)
    return lambda: impl.ioloop.remove_timeout(timer)


# --- declarations ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class QueueState:
    name: str
    message_count: int
    consumer_count: int
    note: str = ""
    survives_restart: bool = True  # durable, neither exclusive nor auto-delete
    queue_type: str = ""  # as declared, or "quorum" when an existing queue was found to be one


ALWAYS_DURABLE = ("quorum", "stream")  # queue types RabbitMQ refuses to declare without `durable`


# What the worker logs, once, of a queue that a broker restart would lose.
NOT_DURABLE = (
    "does not survive a broker restart (not durable, or exclusive/auto-delete): what it holds then is lost. "
    "In production consume a named queue declared with `--durable` or `--queue-type quorum` (or MAILROOM_DURABLE=true)")


def declare_queue(
    connection: pika.BlockingConnection, channel, name: str, *, durable: bool | None = None,
    queue_type: str = "", dead_letter_exchange: str = "", exclusive: bool = False, message_ttl: int | None = None,
    dead_letter_routing_key: str = "", strict: bool = False,
):
    """Declare a missing queue, or use an existing one as it is whatever its arguments.

    `strict`: the arguments are needed (a retry queue's TTL and route back, the dead-letter exchange
    of `--dead-letter-queue`), so an existing queue with other arguments raises `QueueMismatch`
    naming the queue and the argument (one whose durability alone differs is used as it is).

    The one place a queue's arguments are chosen. `durable` None is MAILROOM_DURABLE (default
    False: declared as the RabbitMQ tutorials declare it, so that their code works beside
    Mailroom); a quorum queue and a stream are always durable; an exclusive queue is never. Returns
    `(channel, QueueState)`: a mismatch closes the channel (406), so the caller must go on with the
    channel returned here.
    """
    if durable is None:
        durable = conf.get("MAILROOM_DURABLE")
    durable = (durable or queue_type in ALWAYS_DURABLE) and not exclusive
    arguments = {}
    if queue_type:
        arguments["x-queue-type"] = queue_type
    if dead_letter_exchange or dead_letter_routing_key:  # "" is the default exchange, routed by the key
        arguments["x-dead-letter-exchange"] = dead_letter_exchange
    if dead_letter_routing_key:
        arguments["x-dead-letter-routing-key"] = dead_letter_routing_key
    if message_ttl is not None:
        arguments["x-message-ttl"] = message_ttl
    try:
        ok = channel.queue_declare(
            queue=name, durable=durable, exclusive=exclusive, auto_delete=exclusive, arguments=arguments or None,
        )
        return channel, QueueState(
            name=ok.method.queue, message_count=ok.method.message_count, consumer_count=ok.method.consumer_count,
            survives_restart=durable, queue_type=queue_type,
        )
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        note = exc.reply_text
    survives_restart = _survives_restart(note, declared_durable=durable)
    channel = connection.channel()
    if "'durable'" in note:
        # Refused for its durability, before its arguments were compared: ask again with the
        # queue's own durability to learn whether they differ too (its type, for the log).
        try:
            channel.queue_declare(queue=name, durable=not durable, exclusive=exclusive, auto_delete=exclusive,
                                  arguments=arguments or None)
        except pe.ChannelClosedByBroker as again:
            if again.reply_code != 406:
                raise
            note = f"{note}; {again.reply_text}"
            channel = connection.channel()
    if strict and "inequivalent arg 'x-" in note:
        raise QueueMismatch(f"queue {name!r} exists with other arguments than this command needs: {note}")
    ok = channel.queue_declare(queue=name, passive=True)
    kind = "quorum" if "'quorum'" in note else "stream" if "'stream'" in note else "classic"
    logger.info("queue=%s exists with other arguments; using it as it is (type=%s): %s", name, kind, note)
    return channel, QueueState(
        name=name, message_count=ok.method.message_count, consumer_count=ok.method.consumer_count, note=note,
        survives_restart=survives_restart, queue_type=kind if kind != "classic" else queue_type,
    )


def _survives_restart(note: str, *, declared_durable: bool) -> bool:
    """Whether an existing queue survives a broker restart, from the 406 that refused our declaration.

    RabbitMQ compares `durable`, then `auto_delete`, then the arguments, and names the first that
    differs: so a queue refused for its arguments has the durability we asked for.
    """
    if "'durable'" in note:
        return not declared_durable
    if "'auto_delete'" in note:
        return False  # we never ask for auto-delete on a named queue: this one has it
    return declared_durable


def declare_exchange(connection: pika.BlockingConnection, channel, name: str, *, exchange_type: str,
                     durable: bool | None = None):
    """Declare a missing exchange (`durable` None is MAILROOM_DURABLE), or use an existing one as it is.

    Returns the usable channel.
    """
    durable = conf.get("MAILROOM_DURABLE") if durable is None else durable
    try:
        channel.exchange_declare(exchange=name, exchange_type=exchange_type, durable=durable)
        return channel
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        logger.info("exchange=%s exists with other arguments; using it as it is: %s", name, exc.reply_text)
    channel = connection.channel()
    channel.exchange_declare(exchange=name, passive=True)
    return channel


def queue_states(names, *, timeout: float = 3.0) -> dict[str, QueueState | None]:
    """Ready and consumer counts of queues by passive declares on one connection; None for a missing queue."""
    states: dict[str, QueueState | None] = {}
    connection = connect(timeout=timeout, client_name="mailroom-inspect")
    try:
        channel = connection.channel()
        for name in names:
            try:
                ok = channel.queue_declare(queue=name, passive=True)
                states[name] = QueueState(
                    name=name, message_count=ok.method.message_count, consumer_count=ok.method.consumer_count,
                )
            except pe.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                states[name] = None
                channel = connection.channel()  # a 404 closes the channel
    finally:
        if connection.is_open:
            connection.close()
    return states
