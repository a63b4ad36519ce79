"""Search by words in text bodies and header values (`messaging/search.py`): each database's own index.

PostgreSQL: `messaging_search_document(body, headers)` and a GIN index over it, built CONCURRENTLY (the
consumer keeps writing meanwhile; a million letters take about a minute). SQLite: an FTS5 table whose
rowid is the letter's id, a trigger that deletes a letter's words with it, and the letters already there
indexed.
"""
from django.db import migrations, transaction

# COST: tens of microseconds a row, which the planner must weigh. At the default (100) it read a rare word
# as 0.5 % of the rows and called the function on each letter, newest first, until 50 matched: seconds at
# a million letters, where the GIN index answers in a millisecond. PARALLEL UNSAFE: its EXCEPTION block
# is a subtransaction, which no process may start while a parallel plan runs, the leader included.
POSTGRESQL_FUNCTION = r"""
CREATE OR REPLACE FUNCTION messaging_search_document(body bytea, headers jsonb) RETURNS tsvector
LANGUAGE plpgsql IMMUTABLE PARALLEL UNSAFE COST 10000 AS $$
DECLARE
    header_words tsvector := jsonb_to_tsvector('simple', coalesce(headers, '{}'), '["string", "numeric"]');
BEGIN
    -- A body is text when it is UTF-8 without NUL, which convert_from checks; a binary body is not indexed.
    RETURN to_tsvector('simple', left(convert_from(body, 'UTF8'), 100000)) || header_words;
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character OR program_limit_exceeded THEN
    RETURN header_words;
END $$
"""

FORWARD = {
    "postgresql": [
        POSTGRESQL_FUNCTION,
        ("CREATE INDEX CONCURRENTLY IF NOT EXISTS message_search_idx ON messaging_message "
         "USING gin (messaging_search_document(body, headers))"),
    ],
    "sqlite": [
        ("CREATE VIRTUAL TABLE IF NOT EXISTS messaging_message_search USING fts5("
         "document, tokenize = 'unicode61 remove_diacritics 0')"),
        ("CREATE TRIGGER IF NOT EXISTS messaging_message_search_delete AFTER DELETE ON messaging_message "
         "BEGIN DELETE FROM messaging_message_search WHERE rowid = OLD.id; END"),
    ],
}

BACKWARD = {
    "postgresql": [
        "DROP INDEX CONCURRENTLY IF EXISTS message_search_idx",
        "DROP FUNCTION IF EXISTS messaging_search_document(bytea, jsonb)",
    ],
    "sqlite": [
        "DROP TRIGGER IF EXISTS messaging_message_search_delete",
        "DROP TABLE IF EXISTS messaging_message_search",
    ],
}


def forward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for sql in FORWARD.get(vendor, ()):
        schema_editor.execute(sql)
    if vendor == "sqlite":
        index_letters(apps, schema_editor.connection.alias)


def index_letters(apps, using: str) -> None:
    """The letters already in an SQLite database, indexed as the writers index new ones."""
    from messaging.search import SQLiteSearch

    search = SQLiteSearch()
    letters = apps.get_model("messaging", "Message").objects.using(using).order_by("pk")
    with transaction.atomic(using=using):
        batch = []
        for row in letters.values_list("pk", "body", "headers").iterator(chunk_size=2000):
            batch.append(row)
            if len(batch) == 2000:
                search.add(search.documents(batch), using=using)
                batch = []
        search.add(search.documents(batch), using=using)


def backward(apps, schema_editor):
    for sql in BACKWARD.get(schema_editor.connection.vendor, ()):
        schema_editor.execute(sql)


class Migration(migrations.Migration):

    atomic = False  # CREATE INDEX CONCURRENTLY

    dependencies = [
        ("messaging", "0015_delivery_death_idx"),
    ]

    operations = [
        migrations.RunPython(forward, backward, elidable=False),
    ]
