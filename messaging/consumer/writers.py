"""The consumer's writes, one small writer per database behind one contract (`Writer`).

`recording` decides what to write; a writer decides how, on its database: SQLite takes multi-row
INSERTs on the driver's own cursor, PostgreSQL takes COPY for large batches. Values arrive
already adapted for the database (datetimes, JSON as text). A writer is made once per worker and
shared by its recording threads, each of which uses its own connection.
"""
from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from itertools import chain

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction

from messaging import statements
from messaging.models import Delivery, Message
from messaging.search import PostgreSQLSearch, SearchIndex, SQLiteSearch
from messaging.statements import padded, parts, slots

MESSAGE_COLUMNS = (
    "message_id", "origin", "status", "exchange", "exchange_type", "routing_key", "declare", "body", "body_size",
    "body_sha256", "content_type", "content_encoding", "correlation_id", "delivery_mode", "headers",
    "properties", "last_error", "attempts", "created_at", "raw_message_id",
)
DELIVERY_COLUMNS = (
    "message_id", "queue", "consumer_tag", "delivery_tag", "redelivered", "attempt", "duplicate", "exchange",
    "routing_key", "status", "worker_id", "received_at", "settled_at", "error", "body_size", "body_sha256", "body",
    "anomaly",
)
# What a delivery is compared with (`messaging.consumer.trail.Filed`), read with the look-up by message_id.
FILED_COLUMNS = "message_id, id, body_sha256, exchange, routing_key, origin"
# What a reply is linked by (`messaging.consumer.linking`): the letters Mailroom published with a correlation_id.
REQUEST_COLUMNS = "correlation_id, id, created_at, properties"


class Writer:
    """The contract: the statements of recording a batch, inside the caller's transaction.

    `search` is the database's search index, which `recording` hands the new letters' words.
    """

    search: SearchIndex

    def one_at_a_time(self) -> AbstractContextManager:
        """Held around a batch's transaction: the recording threads of a worker that must take turns."""
        return nullcontext()

    def handler_transaction(self) -> AbstractContextManager:
        """Around a handler and its `handled_at`: rolled back together when the handler fails."""
        return transaction.atomic()

    def message_pks(self, message_ids: list[str]) -> dict[str, tuple]:
        """The messages among `message_ids` that have a row: {message_id: (pk, body_sha256, exchange,
        routing_key, origin)}, what their deliveries are compared with."""
        raise NotImplementedError

    def insert_messages(self, rows: list[tuple]) -> dict[str, int]:
        """Insert `Message` rows (MESSAGE_COLUMNS), skipping those whose message_id another worker wrote
        meanwhile; return {message_id: pk} of those inserted."""
        raise NotImplementedError

    def insert_deliveries(self, rows: list[tuple]) -> list[int]:
        """Insert `Delivery` rows (DELIVERY_COLUMNS); return their pks in the order given."""
        raise NotImplementedError

    def settle(self, status: str, settled_at, delivery_ids: list[int]) -> None:
        """Mark deliveries acked, requeued or rejected at `settled_at`."""
        raise NotImplementedError

    def requests(self, correlation_ids: list[str]) -> list[tuple]:
        """The letters Mailroom published (origin not external) with one of `correlation_ids`:
        (correlation_id, pk, created_at, properties as JSON text or a dict), in no order."""
        raise NotImplementedError

    # shared by both databases
    @staticmethod
    def execute(sql: str, params: list) -> tuple[list[tuple], int, int | None]:
        """Run one statement on the driver's own cursor (with the driver's placeholders); return its
        rows, rowcount and lastrowid. Errors arrive as Django's (`DatabaseError`, `IntegrityError`)."""
        db = connections[DEFAULT_DB_ALIAS]
        db.ensure_connection()
        with db.wrap_database_errors:
            cursor = db.connection.cursor()
            try:
                cursor.execute(sql, params)
                rows = cursor.fetchall() if cursor.description else []
                return rows, cursor.rowcount, getattr(cursor, "lastrowid", None)
            finally:
                cursor.close()


class SQLiteWriter(Writer):
    """SQLite: one writer at a time, multi-row INSERTs bound with the driver's `?`.

    Django's SQLite cursor rewrites every `%s` through a Python callback, which costs more than
    SQLite's own work at thousands of parameters a batch: these statements go to sqlite3 directly.
    """

    def __init__(self) -> None:
        self.search = SQLiteSearch()
        # The worker's recording threads take turns here, which wakes the next at once where
        # SQLite's busy handler polls in steps of milliseconds.
        self._lock = threading.Lock()

    def one_at_a_time(self) -> AbstractContextManager:
        return self._lock

    def handler_transaction(self) -> AbstractContextManager:
        # A transaction around a handler would hold SQLite's database-wide write lock while it runs,
        # starving every other worker: the handler's writes commit as it makes them (handlers are
        # idempotent anyway, delivery being at-least-once).
        return nullcontext()

    def message_pks(self, message_ids: list[str]) -> dict[str, tuple]:
        found: dict[str, tuple] = {}
        for part in parts(list(message_ids)):
            sql = f"SELECT {FILED_COLUMNS} FROM {Message._meta.db_table} WHERE message_id IN ({_marks(len(part))})"
            found.update((row[0], row[1:]) for row in self.execute(sql, padded(part))[0])
        return found

    def insert_messages(self, rows: list[tuple]) -> dict[str, int]:
        inserted = self._insert(Message, MESSAGE_COLUMNS, rows, or_ignore=True)
        if len(inserted) == len(rows):
            return {row[0]: pk for row, pk in zip(rows, inserted)}
        # Some were written by a competing worker meanwhile: ours are the pks this statement took.
        ours = set(inserted)
        return {message_id: filed[0] for message_id, filed in self.message_pks([row[0] for row in rows]).items()
                if filed[0] in ours}

    def insert_deliveries(self, rows: list[tuple]) -> list[int]:
        return self._insert(Delivery, DELIVERY_COLUMNS, rows, or_ignore=False)

    def settle(self, status: str, settled_at, delivery_ids: list[int]) -> None:
        for part in parts(delivery_ids):
            sql = (f"UPDATE {Delivery._meta.db_table} SET status = ?, settled_at = ? "
                   f"WHERE id IN ({_marks(len(part))})")
            self.execute(sql, [status, settled_at, *padded(part)])

    def requests(self, correlation_ids: list[str]) -> list[tuple]:
        found: list[tuple] = []
        for part in parts(list(correlation_ids)):
            sql = (f"SELECT {REQUEST_COLUMNS} FROM {Message._meta.db_table} "
                   f"WHERE correlation_id IN ({_marks(len(part))}) AND origin <> ?")
            found += self.execute(sql, [*padded(part), Message.Origin.EXTERNAL.value])[0]
        return found

    def _insert(self, model, columns: tuple[str, ...], rows: list[tuple], *, or_ignore: bool) -> list[int]:
        """Insert `rows`; return the pks of the rows inserted, in order (fewer when some were ignored).

        Without RETURNING: Python's sqlite3 steps such a statement once per row, giving up the GIL
        at each step, which made the transaction last several times longer while pika was busy. In
        our write transaction a statement's rows take consecutive rowids ending at `lastrowid`.
        """
        pks: list[int] = []
        per_statement = max(1, statements.MAX_PARAMETERS // len(columns))
        for part in parts(rows, per_statement):
            shape = slots(len(part), per_statement)
            row = f"({', '.join(['?'] * len(columns))})"
            sql = (
                f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO {model._meta.db_table} ({', '.join(columns)}) "
                f"SELECT * FROM (VALUES {', '.join([row] * shape)}) WHERE column1 IS NOT NULL"
            )
            params = list(chain.from_iterable(part)) + [None] * (len(columns) * (shape - len(part)))
            _, count, last = self.execute(sql, params)
            pks += range(last - count + 1, last + 1) if count else []
        return pks


def _marks(count: int) -> str:
    """`?` placeholders for a statement written for `slots(count)` values."""
    return ", ".join(["?"] * slots(count))


class PostgreSQLWriter(Writer):
    """PostgreSQL: parameters bound server-side, COPY for large batches.

    psycopg's own cursor sends the parameters apart from the statement (Django's renders them into
    the SQL text), and prepares a statement that runs often (the database's `prepare_threshold`).
    """

    copy_min_rows = 50  # below this, one INSERT round trip beats COPY's extra ones

    def __init__(self) -> None:
        self.search = PostgreSQLSearch()
        self._sequences: dict[str, str] = {}  # table -> its id sequence, looked up once

    def message_pks(self, message_ids: list[str]) -> dict[str, tuple]:
        sql = f"SELECT {FILED_COLUMNS} FROM {Message._meta.db_table} WHERE message_id = ANY(%s)"
        return {row[0]: row[1:] for row in self._execute(sql, [list(message_ids)])}

    def insert_messages(self, rows: list[tuple]) -> dict[str, int]:
        if len(rows) >= self.copy_min_rows:
            try:
                with transaction.atomic():  # a savepoint: a row another worker wrote undoes the COPY alone
                    pks = self._copy(Message, MESSAGE_COLUMNS, rows)
                return {row[0]: pk for row, pk in zip(rows, pks)}
            except IntegrityError:
                pass  # a competing worker wrote one of them meanwhile: insert skipping those
        found: dict[str, int] = {}
        for part in parts(rows, statements.MAX_PARAMETERS // len(MESSAGE_COLUMNS)):
            sql = self._insert_sql(Message, MESSAGE_COLUMNS, len(part))
            sql += " ON CONFLICT DO NOTHING RETURNING message_id, id"
            found.update(self._execute(sql, list(chain.from_iterable(part))))
        return found

    def insert_deliveries(self, rows: list[tuple]) -> list[int]:
        if len(rows) >= self.copy_min_rows:
            return self._copy(Delivery, DELIVERY_COLUMNS, rows)
        pks: list[int] = []
        for part in parts(rows, statements.MAX_PARAMETERS // len(DELIVERY_COLUMNS)):
            sql = self._insert_sql(Delivery, DELIVERY_COLUMNS, len(part)) + " RETURNING id"
            pks += [pk for (pk,) in self._execute(sql, list(chain.from_iterable(part)))]
        return pks

    def settle(self, status: str, settled_at, delivery_ids: list[int]) -> None:
        sql = f"UPDATE {Delivery._meta.db_table} SET status = %s, settled_at = %s WHERE id = ANY(%s)"
        self._execute(sql, [status, settled_at, delivery_ids])

    def requests(self, correlation_ids: list[str]) -> list[tuple]:
        sql = (f"SELECT {REQUEST_COLUMNS} FROM {Message._meta.db_table} "
               "WHERE correlation_id = ANY(%s) AND origin <> %s")
        return self._execute(sql, [list(correlation_ids), Message.Origin.EXTERNAL.value])

    @staticmethod
    def _insert_sql(model, columns: tuple[str, ...], count: int) -> str:
        row = f"({', '.join(['%s'] * len(columns))})"
        return f"INSERT INTO {model._meta.db_table} ({', '.join(columns)}) VALUES {', '.join([row] * count)}"

    @staticmethod
    def _execute(sql: str, params: list) -> list[tuple]:
        import psycopg

        db = connections[DEFAULT_DB_ALIAS]
        db.ensure_connection()
        with db.wrap_database_errors, psycopg.Cursor(db.connection) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def _copy(self, model, columns: tuple[str, ...], rows: list[tuple]) -> list[int]:
        """COPY `rows` in, with pks drawn from the table's sequence first so that they can be returned."""
        table = model._meta.db_table
        if table not in self._sequences:  # in the SELECT list below it would be looked up once per row
            [(self._sequences[table],)] = self._execute("SELECT pg_get_serial_sequence(%s, 'id')", [table])
        pks = [pk for (pk,) in self._execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", [self._sequences[table], len(rows)],
        )]
        db = connections[DEFAULT_DB_ALIAS]
        with db.wrap_database_errors, db.connection.cursor() as cursor:
            with cursor.copy(f"COPY {table} (id, {', '.join(columns)}) FROM STDIN") as copy:
                for pk, row in zip(pks, rows):
                    copy.write_row((pk, *row))
        return pks


def writer_for(vendor: str) -> Writer:
    """The writer for a database vendor ('sqlite', 'postgresql')."""
    writers = {"sqlite": SQLiteWriter, "postgresql": PostgreSQLWriter}
    if vendor not in writers:
        raise NotImplementedError(f"Mailroom's consumer records on SQLite or PostgreSQL, not {vendor}")
    return writers[vendor]()
