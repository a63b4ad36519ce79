"""Finding letters by the words of their text bodies and header values: one contract, one index per database.

What is indexed, on both: a body that is UTF-8 text without NUL (its first `MAX_BODY_CHARS` characters) and
the string and number values of the headers as stored (`messaging/amqp/stored.py`), never their names. A
binary body is not indexed; its letter is still found by its header values. Words are split, and a search
matched, by the database's own full-text machinery, in its 'simple' form: lowercased, no stemming.

- PostgreSQL keeps its index itself: a GIN index over `messaging_search_document(body, headers)`, a SQL
  function migration 0016 creates. Whatever writes a letter (the ORM, the consumer's COPY, an INSERT …
  SELECT) updates it in the same statement, and nothing is computed in Python.
- SQLite: the FTS5 table `messaging_message_search`, its rowid the letter's id. `documents` makes each new
  letter's text (the consumer calls it before taking the write lock), `add` writes it in the transaction
  that inserts the letters, and a trigger deletes it with its letter. Letters are never edited.
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import F, Func, Q, QuerySet
from django.db.models.expressions import RawSQL

from messaging.statements import parts, slots

MAX_BODY_CHARS = 100_000  # the part of a text body that is indexed (PostgreSQL's tsvector holds at most 1 MB)
FEW = 1_000  # a search's matches up to this many are looked up by id (see `search`)
MAX_WORDS = 32  # of a search: more narrow nothing down and only lengthen the query
SQLITE_TABLE = "messaging_message_search"
POSTGRESQL_FUNCTION = "messaging_search_document"


class SearchIndex:
    """The contract: what the writers of letters hand the index, and the filter that finds letters by words."""

    def documents(self, letters: Iterable[tuple[Any, bytes, Any]]) -> dict[Any, str]:
        """The text to index for new letters, given as (key, body, stored headers): {key: text}. Empty when
        the database indexes what it stores itself (`letters` is then not even read)."""
        return {}

    def add(self, documents: dict[int, str], *, using: str = DEFAULT_DB_ALIAS) -> None:
        """Index new letters' texts ({pk: text} from `documents`), in the caller's transaction."""

    def matching(self, words: list[str]) -> Q:
        """Letters holding every one of `words` (from `words_of`, never empty)."""
        raise NotImplementedError


class SQLiteSearch(SearchIndex):
    """SQLite: FTS5, filled by the writers; a search is every word as an FTS5 string (no operators)."""

    def documents(self, letters: Iterable[tuple[Any, bytes, Any]]) -> dict[Any, str]:
        return {key: document(body, headers) for key, body, headers in letters}

    def add(self, documents: dict[int, str], *, using: str = DEFAULT_DB_ALIAS) -> None:
        # The driver's own cursor and `?`, as the consumer's writer does; statement shapes rounded (`slots`).
        db = connections[using]
        db.ensure_connection()
        rows = list(documents.items())
        with db.wrap_database_errors:
            cursor = db.connection.cursor()
            try:
                for part in parts(rows, 1024):
                    shape = slots(len(part), 1024)
                    cursor.execute(
                        f"INSERT INTO {SQLITE_TABLE} (rowid, document) SELECT * FROM "
                        f"(VALUES {', '.join(['(?, ?)'] * shape)}) WHERE column1 IS NOT NULL",
                        list(chain.from_iterable(part)) + [None] * (2 * (shape - len(part))),
                    )
            finally:
                cursor.close()

    def matching(self, words: list[str]) -> Q:
        # Each word an FTS5 string ("" escapes "): `*`, `-`, `:`, `OR`, `NEAR` are then text, never syntax.
        # A string the tokenizer splits (order-4711) matches as a phrase; strings side by side must all match.
        query = " ".join('"' + word.replace('"', '""') + '"' for word in words)
        return Q(pk__in=RawSQL(f"SELECT rowid FROM {SQLITE_TABLE} WHERE {SQLITE_TABLE} MATCH %s", [query]))


class PostgreSQLSearch(SearchIndex):
    """PostgreSQL: the GIN index over `messaging_search_document(body, headers)`; `plainto_tsquery` reads a search."""

    def matching(self, words: list[str]) -> Q:
        from django.contrib.postgres.search import (
            SearchQuery,
            SearchVectorExact,
            SearchVectorField,
        )

        vector = Func(F("body"), F("headers"), function=POSTGRESQL_FUNCTION, output_field=SearchVectorField())
        return Q(SearchVectorExact(vector, SearchQuery(" ".join(words), config="simple", search_type="plain")))


def search_index_for(vendor: str) -> SearchIndex:
    """The search index of a database vendor ('sqlite', 'postgresql')."""
    indexes = {"sqlite": SQLiteSearch, "postgresql": PostgreSQLSearch}
    if vendor not in indexes:
        raise NotImplementedError(f"Mailroom searches letters on SQLite or PostgreSQL, not {vendor}")
    return indexes[vendor]()


def search(queryset: QuerySet, term: str) -> QuerySet:
    """Letters of `queryset` whose message_id, correlation_id or routing key is `term` (as typed or without its
    outer spaces: another producer's id may have some; a pasted one may have gained some), or whose text body
    and header values hold every word of it; all of `queryset` for a blank term. The admin, /messages/ and the
    API all search through this."""
    if not term.strip():
        return queryset
    values = {term, term.strip()}
    exact = Q(message_id__in=values) | Q(routing_key__in=values) | Q(correlation_id__in=values)
    words = words_of(term)
    if not words:
        return queryset.filter(exact)
    matching = search_index_for(connections[queryset.db].vendor).matching(words)
    # A planner cannot tell how rare a word is (PostgreSQL guesses 0.5 % of the rows for any word outside
    # its most common ones): asked for the newest few matches, it tested every letter newest first, seconds
    # at a million letters for a word in one. Unordered, the matches come from the index: up to FEW of
    # them, the page reads those by id; a word in more is common, and its newest letters are found soon.
    few = list(queryset.model._default_manager.using(queryset.db).filter(matching).order_by()
               .values_list("pk", flat=True)[:FEW + 1])
    return queryset.filter(exact | (Q(pk__in=few) if len(few) <= FEW else matching))


def words_of(term: str) -> list[str]:
    """The words of a search as typed: split at spaces, those without a letter or digit dropped (a lone `-`,
    `*` or `"` finds nothing), at most MAX_WORDS. NUL, which no database takes in a query, splits too."""
    return [w for w in term.replace("\x00", " ").split() if any(c.isalnum() for c in w)][:MAX_WORDS]


def document(body: bytes, headers: Any) -> str:
    """The text SQLite indexes for a letter: its body if UTF-8 text without NUL (as `messaging_search_document`
    decides on PostgreSQL: `convert_from` refuses both), then its headers' string and number values."""
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if "\x00" in text:
        text = ""
    return "\n".join((text[:MAX_BODY_CHARS], " ".join(header_values(headers))))


def header_values(headers: Any) -> list[str]:
    """The string and number values in stored headers, depth first (as `jsonb_to_tsvector` takes them)."""
    found, stack = [], [headers]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append(str(value))
    return found
