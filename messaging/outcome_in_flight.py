"""PostgreSQL: a published letter's outcome sent on the confirm, its answer read before the connection's next use.

Once the broker has confirmed a letter, `publish_message` calls `send` (on PostgreSQL, outside a
transaction, without Django's connection pool: see `applies`). The outcome goes to PostgreSQL in
one message, `BEGIN; SET LOCAL synchronous_commit TO OFF; <the UPDATE>; COMMIT`, and the step
returns without waiting for it: PostgreSQL writes it while the caller goes on (a request renders
its answer). `OutcomeInFlight` stands in for the psycopg connection's `wait`, the one call through
which psycopg runs every statement, commit, rollback and setting: the first of them reads the
answer first. So the same connection always reads the outcome written, and nothing the caller runs
next finds a result it did not ask for. Another connection sees it once PostgreSQL has run it,
a fraction of a millisecond later.

If the UPDATE failed, the answer's reader rolls the transaction back. A prepared statement that
was gone is written again in full right there (and preparing turned off: a pooler). Any other
failure (a lock held past lock_timeout, the connection lost) is logged: the letter stays pending,
the relay publishes it again, and the consumer records the copy under the same message_id (at
least once: nothing is lost). The in-memory letter, and so the request's answer, says
`published`: the broker's outcome.

Driven through libpq (psycopg's `pq`), because psycopg itself waits for each statement's result.
The UPDATE is a prepared statement (`PREPARE` once per connection): planning it each time cost
about as much database CPU as running it, and that CPU is taken from the broker on a small machine.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import select
import weakref
from typing import Any

from messaging.models import Message

logger = logging.getLogger(__name__)

_COMMAND_OK = 1  # psycopg.pq.ExecStatus.COMMAND_OK (libpq's PGRES_COMMAND_OK)
_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE
_SQLSTATE = ord("C")  # psycopg.pq.DiagnosticField.SQLSTATE
_DUPLICATE_PREPARED = "42P05"  # this session has it already (named after its text: the same statement)
_NO_SUCH_PREPARED = "26000"  # gone: a pooler moved us to another server session, or a DISCARD ALL
_PERMANENT = ("0A", "42")  # classes of a PREPARE error that trying again would not mend (unsupported, syntax/access)

_prepared: weakref.WeakSet = weakref.WeakSet()  # the psycopg connections whose session has the statement
_use_prepared = True  # off for the process once a statement vanished (a pooler), or a PREPARE cannot work


def applies(db) -> bool:
    """Whether `db` (PostgreSQL outside a transaction) can take an outcome in flight.

    Not with Django's connection pool: psycopg_pool discards a connection handed back while a
    outcome's answer is unread (it looks busy).
    """
    return not db.settings_dict["OPTIONS"].get("pool")


def send(message: Message, db, fields: dict[str, Any]) -> None:
    """Send the `published` outcome `fields` of `message` on `db`; its answer is read at the connection's next use."""
    with db.wrap_database_errors:  # Django's exceptions, and its note that the connection erred
        db.ensure_connection()
        pg = db.connection
        OutcomeInFlight.settle(pg)  # an earlier step's, on this connection
        pgconn = pg.pgconn
        try:
            prepared = _prepare(db, pg, pgconn)
            pk, published_at = int(message.pk), fields["published_at"].isoformat()
            _send(pgconn, _outcome_sql(prepared, pk, published_at))
        except (KeyboardInterrupt, SystemExit):
            pg.close()  # a result may be left unread: the next use reconnects instead
            raise
    OutcomeInFlight(pg, message.message_id, pk, published_at)


class OutcomeInFlight:
    """A published outcome sent on a psycopg connection whose answer is not read yet (see the module)."""

    def __init__(self, pg, message_id: str, pk: int, published_at: str) -> None:
        self.pg, self.message_id, self.pk, self.published_at = pg, message_id, pk, published_at
        # Instance attributes, found before psycopg's methods: the next operation, or closing the
        # connection (Django past CONN_MAX_AGE), reads the answer first.
        pg.wait, pg.close = self, self.close

    def __call__(self, *args, **kwargs):
        self.read_answer()
        return self.pg.wait(*args, **kwargs)

    def close(self) -> None:
        self.read_answer()
        self.pg.close()

    def read_answer(self) -> None:
        pgconn = self.pg.pgconn
        try:
            error = _first_error(pgconn)
            if error is not None:
                _end_transaction(pgconn)
                _forget(error)
                if error == _NO_SUCH_PREPARED:  # in full this time
                    _send(pgconn, _outcome_sql(False, self.pk, self.published_at))
                    error = _first_error(pgconn)
                    if error is not None:
                        _end_transaction(pgconn)
        except Exception as exc:  # psycopg's error for a lost connection; what comes next reports it
            logger.warning("message_id=%s the answer to its published outcome was lost (%s): if it was not "
                           "written, the letter stays pending and the relay publishes it again",
                           self.message_id, exc.__class__.__name__)
            return
        except BaseException:
            self._restore()
            self.pg.close()  # interrupted: the next use reconnects instead
            raise
        finally:
            self._restore()
        if error is not None:
            logger.warning("message_id=%s its published outcome was not written (SQLSTATE %s): the letter stays "
                           "pending and the relay publishes it again", self.message_id, error)

    def _restore(self) -> None:
        """psycopg's own `wait` and `close` again."""
        vars(self.pg).pop("wait", None)
        vars(self.pg).pop("close", None)

    @staticmethod
    def settle(pg) -> None:
        """Read the answer of an outcome in flight on `pg`, if there is one."""
        in_flight = vars(pg).get("wait")
        if isinstance(in_flight, OutcomeInFlight):
            in_flight.read_answer()


def _end_transaction(pgconn) -> None:
    """Roll back what a failed statement left open (its BEGIN ran, the COMMIT after it was skipped)."""
    if pgconn.transaction_status != _IDLE:
        _send(pgconn, "ROLLBACK")
        _first_error(pgconn)


def _prepare(db, pg, pgconn) -> bool:
    """Whether the UPDATE is prepared in `pg`'s session: PREPARE it there the first time."""
    global _use_prepared
    if not _use_prepared or db.settings_dict["OPTIONS"].get("prepare_threshold", 0) is None:
        return False
    if pg in _prepared:
        return True
    _send(pgconn, _prepare_sql())
    error = _first_error(pgconn)
    if error in (None, _DUPLICATE_PREPARED):
        _prepared.add(pg)
        return True
    if error.startswith(_PERMANENT):
        logger.warning("preparing the published outcome's UPDATE failed (SQLSTATE %s): it is sent in full "
                       "from now on", error)
        _use_prepared = False
    return False  # a lock timeout, a cancel: in full this time, prepared the next


def _forget(error: str) -> None:
    """After a failed UPDATE: a prepared statement gone from the session turns preparing off.

    A web connection prepares nothing else (Django's cursors bind client-side), so psycopg never
    sends its `DEALLOCATE ALL` there: the statement went with a pooler handing out another server
    session, or an operator's DISCARD ALL.
    """
    global _use_prepared
    if error == _NO_SUCH_PREPARED and _use_prepared:
        logger.warning("the prepared UPDATE of published outcomes was gone from the database session (a pooler "
                       "in transaction mode?): it is sent in full from now on")
        _use_prepared = False


@functools.cache
def _update(published_at: str, pk: str) -> str:
    """The UPDATE of a published outcome: `attempts + 1`, the constants, and these two SQL expressions."""
    from django.db import connection

    from messaging.publishing import outcome_fields

    values = {name: "NULL" if value is None else published_at if name == "published_at"
              else "'" + str(value).replace("'", "''") + "'"
              for name, value in outcome_fields(Message.Status.PUBLISHED).items()}
    meta, quote = Message._meta, connection.ops.quote_name
    attempts = quote(meta.get_field("attempts").column)
    sets = ", ".join(f"{quote(meta.get_field(name).column)} = {literal}" for name, literal in values.items())
    return f"UPDATE {quote(meta.db_table)} SET {attempts} = {attempts} + 1, {sets} WHERE {quote(meta.pk.column)} = {pk}"


@functools.cache
def statement_name() -> str:
    """Named after its text: a session that has it (a pooler's, an older deploy's) has this very statement."""
    return "mailroom_published_" + hashlib.sha256(_update("$1", "$2").encode()).hexdigest()[:12]


def _prepare_sql() -> str:
    return f"PREPARE {statement_name()}(timestamptz, bigint) AS {_update('$1', '$2')}"


@functools.cache
def _outcome_template(prepared: bool) -> str:
    """BEGIN, a relaxed commit (see `publishing.relaxed_commit`), the UPDATE and COMMIT, with slots
    for the pk (an int) and `published_at` (ISO text of an aware datetime).

    Literals, not parameters: rendering them with psycopg's client-side binding cost ~0.1 ms here.
    """
    update = f"EXECUTE {statement_name()}('{{published_at}}', {{pk}})" if prepared else _update("'{published_at}'", "{pk}")
    return f"BEGIN; SET LOCAL synchronous_commit TO OFF; {update}; COMMIT"


def _outcome_sql(prepared: bool, pk: int, published_at: str) -> str:
    return _outcome_template(prepared).format(pk=pk, published_at=published_at)


def _send(pgconn, sql: str) -> None:
    pgconn.send_query(sql.encode())
    while pgconn.flush():  # psycopg keeps libpq non-blocking: push the rest out
        _wait(pgconn, select.POLLOUT)


def _first_error(pgconn) -> str | None:
    """Read every result of the statements sent: None if all succeeded, else the first error's SQLSTATE.

    Waits in `poll` (the GIL released, other threads run) rather than in libpq's blocking
    `PQgetResult`, which holds the GIL for as long as a row lock may make the UPDATE wait.
    """
    error = None
    while True:
        if pgconn.is_busy():
            pgconn.consume_input()  # what has arrived already: usually all of it
            while pgconn.is_busy():
                _wait(pgconn, select.POLLIN)
                pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return error
        if error is None and result.status != _COMMAND_OK:
            error = (result.error_field(_SQLSTATE) or b"?").decode()


def _wait(pgconn, event: int) -> None:
    poller = select.poll()
    poller.register(pgconn.socket, event)
    poller.poll()
