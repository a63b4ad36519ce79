"""messaging.search without a database: what SQLite indexes of a letter, and the words of a search."""
from __future__ import annotations

from messaging.search import MAX_WORDS, document, words_of


def test_what_sqlite_indexes_matches_what_postgresql_indexes():
    """`document` decides text as PostgreSQL's convert_from does, and takes header values, not names."""
    assert document(b"caf\xc3\xa9 menu", {}) == "café menu\n"
    assert document(b"\xff\xfe", {"a": "x"}) == "\nx"  # not UTF-8
    assert document(b"a\x00b", {}) == "\n"  # NUL
    assert document(b"\xed\xa0\x80", {}) == "\n"  # an encoded surrogate is not UTF-8
    headers = {"s": "one", "n": 2, "f": 2.5, "b": True, "none": None, "l": ["three", {"k": "four"}],
               "bytes": {"$bytes": "/wA="}}
    assert document(b"", headers) == "\none 2 2.5 three four /wA="


def test_a_search_is_words_never_syntax():
    assert words_of('  order-4711 "shipped" OR * - : a\x00nul ') == ["order-4711", '"shipped"', "OR", "a", "nul"]
    assert words_of('" * - : ( )') == []  # nothing to look for: nothing found
    assert len(words_of("w " * 100)) == MAX_WORDS
