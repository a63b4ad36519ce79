"""PostgreSQL: a published letter's outcome sent on the confirm, its answer read before the
connection's next use (`messaging.outcome_in_flight`), with the real broker and database."""
from __future__ import annotations

import contextlib
import logging
import time
import weakref

import pytest
from django.db import connection, connections, transaction

from messaging import outcome_in_flight, publishing
from messaging.models import Message
from messaging.publishing import publish_message

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite writes the outcome after the confirm"),
]


def pending(queue: str, count: int) -> list[Message]:
    with transaction.atomic():
        return [Message.objects.create(routing_key=queue, body=b"x", status=Message.Status.PENDING)
                for _ in range(count)]


def statuses_seen_elsewhere(letters: list[Message]) -> set[str]:
    """The letters' statuses read on a connection of its own."""
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT status FROM messaging_message WHERE id = ANY(%s)", [[m.pk for m in letters]])
            return {status for (status,) in cursor.fetchall()}
    finally:
        other.close()


def prepared_here() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = %s", [outcome_in_flight.statement_name()])
        return cursor.fetchone()[0]


@contextlib.contextmanager
def row_locked_elsewhere(letter: Message):
    """Another transaction holds `letter`'s row; this session gives up on a lock after 300 ms."""
    other = connections.create_connection("default")
    other.set_autocommit(False)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT id FROM messaging_message WHERE id = %s FOR UPDATE", [letter.pk])
        with connection.cursor() as cursor:  # this session only: the fixture closes it afterwards
            cursor.execute("SET lock_timeout = '300ms'")
        yield
    finally:
        other.rollback()
        other.close()


@pytest.fixture(autouse=True)
def new_session(monkeypatch):
    """Each test starts on a database session of its own, with nothing prepared and nothing learnt."""
    monkeypatch.setattr(outcome_in_flight, "_use_prepared", True)
    monkeypatch.setattr(outcome_in_flight, "_prepared", weakref.WeakSet())
    connection.close()
    yield
    connection.close()  # settings a test changed for its connection go with it


def test_nothing_reaches_the_database_before_the_confirm(queue_name, monkeypatch):
    """While the broker is asked, the row is pending and the connection idle: a publish that never
    returns (the process dies mid-publish) leaves the letter pending for the relay, the connection
    reusable. Another outcome than `published` is written in full, before the step returns."""
    with transaction.atomic():
        letter = Message.objects.create(routing_key=queue_name, body=b"x", status=Message.Status.PENDING)
    seen = {}

    def publish_that_dies(message):
        seen["idle"] = connection.connection.info.transaction_status == 0
        raise RuntimeError("the process dies while the broker is asked")

    with monkeypatch.context() as patch:
        patch.setattr(publishing, "publish_once", publish_that_dies)
        with pytest.raises(RuntimeError, match="process dies"):
            publish_message(letter)
    assert seen == {"idle": True}
    assert "wait" not in vars(connection.connection)
    letter.refresh_from_db()
    assert letter.status == Message.Status.PENDING and letter.attempts == 0 and letter.published_at is None
    assert publish_message(letter).status  # no queue is bound: the broker returns it == Message.Status.UNROUTABLE
    assert "wait" not in vars(connection.connection)  # written in full, nothing in flight
    assert statuses_seen_elsewhere([letter]) == {Message.Status.UNROUTABLE}
    letter.refresh_from_db()
    assert letter.status == Message.Status.UNROUTABLE and letter.attempts == 1 and "NO_ROUTE" in letter.last_error


def test_the_outcomes_answer_is_read_before_the_connections_next_use(amqp, queue_name):
    """The step returns once the outcome is sent. Whatever the connection runs next (a query, a
    transaction's autocommit switch, another publish) reads the answer first, and sees `published`;
    closing the connection reads the last answer first, and another connection then sees them all."""
    amqp.queue_declare(queue_name, durable=True)
    letters = pending(queue_name, 4)
    publish_message(letters[0])
    pg = connection.connection
    assert isinstance(vars(pg).get("wait"), outcome_in_flight.OutcomeInFlight)  # sent, its answer not read yet
    assert Message.objects.get(pk=letters[0].pk).status == Message.Status.PUBLISHED
    assert "wait" not in vars(pg)  # psycopg's own wait again
    publish_message(letters[1])
    with transaction.atomic():  # psycopg's autocommit switch, then a write
        Message.objects.filter(pk=letters[3].pk).update(last_error="")
    assert "wait" not in vars(pg)
    publish_message(letters[2])  # the next step reads the previous one's answer itself
    publish_message(letters[3])
    connection.close()  # reads the last answer first
    deadline = time.monotonic() + 5
    while statuses_seen_elsewhere(letters) != {Message.Status.PUBLISHED} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert statuses_seen_elsewhere(letters) == {Message.Status.PUBLISHED}
    assert [amqp.basic_get(queue_name, auto_ack=True)[2] for _ in range(4)] == [b"x"] * 4


def test_an_answer_that_is_an_error_is_logged_and_the_connection_goes_on(caplog):
    connection.ensure_connection()
    pg = connection.connection
    outcome_in_flight._send(pg.pgconn, "BEGIN; SELECT 1/0; COMMIT")  # stands for an outcome that failed
    outcome_in_flight.OutcomeInFlight(pg, "letter-1", 0, "2026-01-01T00:00:00+00:00")
    with caplog.at_level(logging.WARNING, logger="messaging.outcome_in_flight"):
        assert Message.objects.filter(pk=0).count() == 0  # the answer is read first, then this runs
    assert "message_id=letter-1 its published outcome was not written (SQLSTATE 22012)" in caplog.text
    assert "wait" not in vars(pg) and pg.info.transaction_status == 0  # IDLE


def test_the_update_is_prepared_once_and_a_statement_gone_is_written_in_full(amqp, queue_name, caplog):
    """Prepared once per session. Gone later (a pooler handing out another server session, a
    DISCARD ALL): that outcome is written again in full when its answer is read (no second publish
    needed), and from then on the UPDATE is sent in full."""
    amqp.queue_declare(queue_name, durable=True)
    letters = pending(queue_name, 4)
    publish_message(letters[0])
    publish_message(letters[1])
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 1  # once, for both
        cursor.execute("DEALLOCATE ALL")
    with caplog.at_level(logging.WARNING, logger="messaging.outcome_in_flight"):
        publish_message(letters[2])
        publish_message(letters[3])
    assert "gone from the database session" in caplog.text and "not written" not in caplog.text
    assert outcome_in_flight._use_prepared is False and prepared_here() == 0
    for letter in letters:
        letter.refresh_from_db()
        assert letter.status == Message.Status.PUBLISHED and letter.attempts == 1 and letter.published_at


def test_a_statement_gone_at_its_first_execute_is_a_pooler_and_stops_preparing(amqp, queue_name, monkeypatch, caplog):
    """A pooler in transaction mode runs the PREPARE in one server session and the letter's
    transaction in another: the statement is not there at its first EXECUTE. That outcome is written
    again in full, and so is the UPDATE from then on."""
    monkeypatch.setattr(outcome_in_flight, "_prepare_sql", lambda: "BEGIN; COMMIT")  # "prepared" elsewhere
    amqp.queue_declare(queue_name, durable=True)
    first, second = pending(queue_name, 2)
    with caplog.at_level(logging.WARNING, logger="messaging.outcome_in_flight"):
        publish_message(first)
        first.refresh_from_db()  # reads the answer
    assert "gone from the database session" in caplog.text
    assert outcome_in_flight._use_prepared is False
    publish_message(second)
    for letter in (first, second):
        letter.refresh_from_db()
        assert letter.status == Message.Status.PUBLISHED and letter.attempts == 1
    assert prepared_here() == 0


def test_another_outcome_is_written_before_the_step_returns(queue_name):
    """No such exchange: `failed` is written in full before the step returns, on the row and in memory."""
    with transaction.atomic():
        letter = Message.objects.create(exchange=f"no-such-{queue_name}", routing_key="k", body=b"x",
                                        status=Message.Status.PENDING)
    assert publish_message(letter).status == Message.Status.FAILED
    assert letter.attempts == 1 and letter.published_at is None and "404" in letter.last_error
    letter.refresh_from_db()
    assert letter.status == Message.Status.FAILED and letter.attempts == 1 and letter.published_at is None
    assert "404" in letter.last_error and letter.next_attempt_at is None
    assert "wait" not in vars(connection.connection)  # nothing in flight: the outcome was written in full


def test_no_prepared_statement_when_they_are_turned_off(amqp, queue_name, monkeypatch):
    """MAILROOM_PG_PREPARED_STATEMENTS=false (psycopg's prepare_threshold None): the UPDATE is sent in full."""
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "prepare_threshold", None)
    amqp.queue_declare(queue_name, durable=True)
    (letter,) = pending(queue_name, 1)
    assert publish_message(letter).status == Message.Status.PUBLISHED
    letter.refresh_from_db()
    assert letter.status == Message.Status.PUBLISHED and letter.attempts == 1
    assert prepared_here() == 0


def test_a_locked_letter_leaves_its_outcome_unwritten_and_the_connection_goes_on(queue_name, amqp, caplog):
    """Another transaction holds the letter's row past lock_timeout: the connection's next use reads
    the failure, rolls back what it left open, logs it, and runs; the letter stays pending for the relay."""
    amqp.queue_declare(queue_name, durable=True)
    (letter,) = pending(queue_name, 1)
    with row_locked_elsewhere(letter):
        assert publish_message(letter).status == Message.Status.PUBLISHED  # the broker has it
        with caplog.at_level(logging.WARNING, logger="messaging.outcome_in_flight"):
            assert Message.objects.filter(pk=letter.pk).count() == 1  # waits out the lock, then runs
    assert f"message_id={letter.message_id} its published outcome was not written (SQLSTATE 55P03)" in caplog.text
    assert connection.connection.info.transaction_status == 0  # IDLE: nothing left open
    letter.refresh_from_db()
    assert letter.status == Message.Status.PENDING and letter.attempts == 0
    assert amqp.basic_get(queue_name, auto_ack=True)[2] == b"x"


def test_closing_the_connection_reads_the_answer_first(queue_name, amqp, caplog):
    """Django closes a connection past CONN_MAX_AGE at the end of a request: a failure in flight is
    still read and logged (here a row lock held past lock_timeout)."""
    amqp.queue_declare(queue_name, durable=True)
    (letter,) = pending(queue_name, 1)
    with row_locked_elsewhere(letter):
        publish_message(letter)
        with caplog.at_level(logging.WARNING, logger="messaging.outcome_in_flight"):
            connection.close()
    assert "its published outcome was not written (SQLSTATE 55P03)" in caplog.text
    letter.refresh_from_db()
    assert letter.status == Message.Status.PENDING


def test_a_published_outcome_in_flight_then_another_outcome_written_in_full(amqp, queue_name):
    """The ordinary write (`record_outcome`, on the driver's cursor) reads the answer in flight first."""
    amqp.queue_declare(queue_name, durable=True)
    (published,) = pending(queue_name, 1)
    (returned,) = pending(f"{queue_name}-nobody", 1)
    publish_message(published)
    assert publish_message(returned).status == Message.Status.UNROUTABLE
    assert statuses_seen_elsewhere([published]) == {Message.Status.PUBLISHED}
    assert statuses_seen_elsewhere([returned]) == {Message.Status.UNROUTABLE}


def test_a_failed_answer_then_a_transaction(caplog):
    """`atomic()` switches psycopg's autocommit: the failed answer is read and rolled back first."""
    connection.ensure_connection()
    pg = connection.connection
    outcome_in_flight._send(pg.pgconn, "BEGIN; SELECT 1/0; COMMIT")
    outcome_in_flight.OutcomeInFlight(pg, "letter-2", 0, "2026-01-01T00:00:00+00:00")
    with caplog.at_level(logging.WARNING, logger="messaging.outcome_in_flight"), transaction.atomic():
        assert Message.objects.filter(pk=0).count() == 0
    assert "message_id=letter-2" in caplog.text and pg.info.transaction_status == 0

