"""Search by words in text bodies and header values: the admin, /messages/ and the API find exactly the letters
that hold them, on the database's own index, kept by every way a letter is written (`messaging/search.py`)."""
from __future__ import annotations

import pika
import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection

from messaging.consumer.recording import Received, record_batch
from messaging.models import Message
from messaging.outbox.publishing import create_message, republish
from messaging.search import search
from messaging.web.api import create_token
from tests.consuming_checks import publish

RARE = "zanzibar"
TRICKY = ['"', '""', "*", "OR", "-", ":", "AND", "NOT", "NEAR(a b)", "a:b", f"{RARE} OR", f'"{RARE}', f"{RARE}*",
          "-x", "^a", "(", ")", "!", "&", "|", "<->", "'", "\\", "col:word", "+", "%", "_", "a" * 900, "é ü ß", "🙂"]


def received(tag: int, *, body: bytes, headers: dict | None = None, queue: str = "search-q") -> Received:
    return Received(queue=queue, consumer_tag="search-ctag", delivery_tag=tag, redelivered=False, exchange="",
                    routing_key=queue, body=body,
                    properties=pika.BasicProperties(message_id=f"search-{tag}", headers=headers))


def consume(letters: list[Received]) -> None:
    """Record `letters` as the consumer does (its writer, its batches of 500)."""
    for start in range(0, len(letters), 500):
        record_batch(letters[start:start + 500], worker_id=None)


@pytest.fixture
def ten_thousand():
    """10,000 letters from another producer; the rare word in the bodies of exactly 3, and near misses."""
    chosen = {17: f"order {RARE} shipped".encode(), 4242: f"{RARE.upper()}!".encode(),
              9999: f'{{"city": "{RARE}"}}'.encode()}
    letters = [received(i, body=chosen.get(i, f"letter {i} of the routine kind".encode()), headers={"n": i})
               for i in range(10_000)]
    letters += [
        received(10_001, body=f"\xff\xfe {RARE} not utf-8".encode("latin-1")),  # binary: not indexed
        received(10_002, body=f"{RARE}\x00with a NUL".encode()),  # not text on PostgreSQL either
        received(10_003, body=f"{RARE}s".encode()),  # another word
    ]
    consume(letters)
    return {"search-17", "search-4242", "search-9999"}


@pytest.fixture
def auditor(client):
    user = User.objects.create_user("search-auditor", password="pw-for-tests", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename="view_message"))
    client.force_login(user)
    return user


def found_in_admin(client, term: str) -> set[str]:
    response = client.get("/admin/messaging/message/", {"q": term})
    assert response.status_code == 200
    return {m.message_id for m in response.context["cl"].result_list}


def found_on_page(client, term: str) -> set[str]:
    response = client.get("/messages/", {"q": term})
    assert response.status_code == 200
    return {row["message"].message_id for row in response.context["rows"]}


def found_by_api(client, key: str, term: str) -> set[str]:
    response = client.get("/api/messages/", {"search": term, "page_size": 500}, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 200, response.content
    return {row["message_id"] for row in response.json()["results"]}


def everywhere(client, key: str, term: str) -> set[str]:
    """What the admin, the page and the API find for `term`, asserted to be the same."""
    admin, page, api = found_in_admin(client, term), found_on_page(client, term), found_by_api(client, key, term)
    assert admin == page == api, (term, admin, page, api)
    return admin


@pytest.mark.django_db
def test_a_word_in_3_of_10000_bodies_finds_exactly_those_3_in_admin_page_and_api(client, auditor, ten_thousand):
    key = create_token(user=auditor, name="search")[1]
    assert everywhere(client, key, RARE) == ten_thousand  # any case, inside JSON; not the binary, NUL or plural ones
    assert everywhere(client, key, f"shipped {RARE.capitalize()}") == {"search-17"}  # every word, in any order
    assert everywhere(client, key, "routine shipped") == set()  # words of different letters
    assert everywhere(client, key, "letter 5000") == {"search-5000"}
    assert everywhere(client, key, "search-4242") == {"search-4242"}  # the exact message_id, as before
    response = client.get("/messages/", {"q": f"<b>{RARE}</b>"})
    assert b"&lt;b&gt;zanzibar&lt;/b&gt;" in response.content and b"<b>zanzibar" not in response.content


@pytest.mark.django_db
def test_header_values_are_searched_but_not_header_names(client, auditor):
    consume([
        received(1, body=b"\x00\x01\x02", headers={"x-city": "Zanzibar harbour", "tags": ["blue", {"deep": 4711}]}),
        received(2, body=b"plain", headers={"harbour": "none"}),
    ])
    key = create_token(user=auditor, name="search")[1]
    assert everywhere(client, key, "harbour") == {"search-1"}  # the binary body's letter, by its header value
    assert everywhere(client, key, "4711") == {"search-1"}
    assert everywhere(client, key, "x-city") == set()
    assert everywhere(client, key, "blue zanzibar") == {"search-1"}


@pytest.mark.django_db
def test_operators_and_odd_input_never_fail(client, auditor):
    consume([received(1, body=f"{RARE} and more".encode())])
    key = create_token(user=auditor, name="search")[1]
    for term in TRICKY:
        found = everywhere(client, key, term)
        assert found <= {"search-1"}, term
    assert everywhere(client, key, f'"{RARE}') == {"search-1"}  # a quote is no syntax
    assert everywhere(client, key, f"{RARE} OR") == set()  # OR is a word, which the letter does not hold
    long = {"search": "a " * 600, "page_size": 500}
    answer = client.get("/api/messages/", long, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert answer.status_code == 400 and answer.json()["errors"]["search"]  # a clear refusal, not a slow query
    assert found_on_page(client, "a " * 600) == set() and found_in_admin(client, "a " * 600) == set()


@pytest.mark.django_db
def test_every_way_of_writing_a_letter_indexes_it(fresh_publisher, queue_name):
    published = create_message(routing_key=queue_name, body=b"published kookaburra", headers={"h": "cassowary"},
                               origin=Message.Origin.API)
    copy = republish(published)
    consume([received(1, body=b"consumed kookaburra")])
    found = set(search(Message.objects.all(), "kookaburra").values_list("message_id", flat=True))
    assert found == {published.message_id, copy.message_id, "search-1"}
    assert set(search(Message.objects.all(), "cassowary").values_list("pk", flat=True)) == {published.pk, copy.pk}


@pytest.mark.django_db(transaction=True)
def test_a_search_right_after_consume_finds_the_letters(manage, queue_name):
    ids = publish(queue_name, 3, body=b"lyrebird in a consumed body", declare=True)
    worker = manage("consume", queue_name, "--durable", "--max-messages", "3", "--inactivity-timeout", "20")
    assert worker.wait(40) == 0, worker.output[-2000:]
    assert set(search(Message.objects.all(), "LYREBIRD").values_list("message_id", flat=True)) == set(ids)
    Message.objects.filter(message_id__in=ids).delete()  # deleted letters leave the index with them
    assert not search(Message.objects.all(), "lyrebird").exists()


@pytest.mark.django_db
def test_a_search_in_a_parallel_plan():
    """PostgreSQL's parallel workers may not run the index's function (its EXCEPTION block is a subtransaction):
    a plan with workers that calls it on each row, which large tables get, must still answer."""
    consume([received(i, body=f"letter {i}".encode()) for i in range(200)])
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            for setting in ("parallel_setup_cost", "parallel_tuple_cost", "min_parallel_table_scan_size",
                            "min_parallel_index_scan_size"):
                cursor.execute(f"SET LOCAL {setting} = 0")
            for scan in ("enable_bitmapscan", "enable_indexscan"):  # the function called on each row read
                cursor.execute(f"SET LOCAL {scan} = off")
            mode = "debug_parallel_query" if connection.pg_version >= 160000 else "force_parallel_mode"
            cursor.execute(f"SET LOCAL {mode} = on")
        assert list(search(Message.objects.all(), "letter 150").values_list("message_id", flat=True)) == ["search-150"]
        assert search(Message.objects.order_by(), "letter").count() == 200
