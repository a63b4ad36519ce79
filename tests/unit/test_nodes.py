"""Which node a process connects to (`Nodes`), and the cluster's nodes as the pages show them, from a
recorded management API answer (a three-node cluster with a node down, a partition and an alarm)."""
from __future__ import annotations

import logging
from collections import Counter

import pytest
from django.template.loader import render_to_string

from messaging.amqp import management
from messaging.amqp.connection import Nodes, connect, connection_parameters
from messaging.errors import ConnectionLost
from messaging.web import cluster
from messaging.web.queues import BrokerView, QueueRow

THREE = "amqp://g:secret@one.example:5672/%2F,amqp://g:secret@two.example:5672/%2F,amqp://g:secret@three.example/%2F"
ADDRESSES = connection_parameters(url=THREE)


def test_processes_started_one_after_another_spread_evenly_over_the_nodes():
    firsts = Counter(Nodes(offset=pid).order(3)[0] for pid in range(4000, 4030))
    assert firsts == {0: 10, 1: 10, 2: 10}


def test_each_process_fails_over_through_every_address_once():
    for offset in range(6):
        order = Nodes(offset=offset).order(3)
        assert sorted(order) == [0, 1, 2] and order[0] == offset % 3


def test_after_a_connection_the_next_one_starts_at_another_node():
    nodes = Nodes(offset=0)
    assert nodes.order(3)[0] == 0
    nodes.connected(0, ADDRESSES, client_name="t")
    assert nodes.current == "one.example:5672"
    assert nodes.order(3)[0] != 0 and sorted(nodes.order(3)) == [0, 1, 2]


def test_the_processes_of_a_lost_node_go_to_different_survivors():
    survivors = set()
    for offset in (0, 3, 6, 9, 1, 4):  # all start on node 0 (offset % 3 == 0) but differ otherwise
        nodes = Nodes(offset=offset)
        if nodes.order(3)[0] != 0:
            continue
        nodes.connected(0, ADDRESSES, client_name="t")
        survivors.add(nodes.order(3)[0])
    assert survivors == {1, 2}


def test_one_address_is_always_the_first():
    nodes = Nodes(offset=7)
    single = connection_parameters(url="amqp://h.example/%2F")
    assert nodes.order(1) == [0]
    nodes.connected(0, single, client_name="t")
    assert nodes.order(1) == [0] and nodes.current == "h.example:5672"


def test_the_log_line_names_the_node_not_the_password(caplog):
    caplog.set_level(logging.INFO, logger="messaging.amqp.connection")
    Nodes(offset=1).connected(1, ADDRESSES, client_name="mailroom-consume host-a")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "connected to RabbitMQ node=two.example:5672 address=2/3 client=mailroom-consume host-a"
    assert "secret" not in caplog.text


def test_nodes_that_all_refuse_raise_a_lost_connection_after_trying_each(caplog):
    caplog.set_level(logging.DEBUG, logger="messaging.amqp.connection")
    nodes = Nodes(offset=1)
    with pytest.raises(ConnectionLost):
        connect(url="amqp://guest:guest@127.0.0.1:1/%2F,amqp://guest:guest@127.0.0.1:2/%2F", timeout=2, nodes=nodes)
    tried = [r.getMessage().split()[1] for r in caplog.records if "did not answer" in r.getMessage()]
    assert tried == ["node=127.0.0.1:2", "node=127.0.0.1:1"] and nodes.current == ""


# --- the cluster's nodes on the pages -------------------------------------------------------
# /api/nodes of a three-node cluster (RabbitMQ 3.10, the fields Mailroom reads): rabbit@b is down,
# rabbit@a cannot reach rabbit@c, rabbit@c has a memory alarm; a name carries markup.
RECORDED_NODES = [
    {"name": "rabbit@a", "running": True, "mem_alarm": False, "disk_free_alarm": False,
     "partitions": ["rabbit@c"], "uptime": 93_784_000, "type": "disc"},
    {"name": "rabbit@b", "running": False, "mem_alarm": False, "disk_free_alarm": False, "partitions": []},
    {"name": "rabbit@c<script>x()</script>", "running": True, "mem_alarm": True, "disk_free_alarm": False,
     "partitions": [], "uptime": 59_000},
    "not a node",
]
RECORDED_QUEUE = {"name": "orders", "type": "quorum", "leader": "rabbit@a", "members": ["rabbit@a", "rabbit@b",
                  "rabbit@c"], "online": ["rabbit@a", "rabbit@c"], "node": None, "messages_ready": 3}


@pytest.fixture
def recorded(settings, monkeypatch):
    settings.RABBITMQ_MANAGEMENT_URL = "http://guest:guest@mq.example:15672/"
    monkeypatch.setattr(management, "get", lambda path: RECORDED_NODES if path == "nodes" else None)


def test_nodes_read_from_a_recorded_answer(recorded):
    a, b, c = cluster.nodes()
    assert (a.name, a.running, a.partitions, a.uptime) == ("rabbit@a", True, ("rabbit@c",), "1 d 2 h")
    assert (b.running, b.uptime) == (False, "")
    assert c.mem_alarm and c.uptime == "59 s"
    assert cluster.troubles([a, b, c]) == ["network partition: rabbit@a cannot reach rabbit@c",
                                           "node rabbit@b is down"]
    assert cluster.alarms([a, b, c]) == ["memory alarm on rabbit@c<script>x()</script>"]


@pytest.mark.parametrize("answer", [None, {"error": "not_authorised"}, [{"name": ["odd"], "uptime": "soon",
                                                                         "partitions": "all"}]])
def test_an_odd_or_missing_answer_is_no_error(settings, monkeypatch, answer):
    settings.RABBITMQ_MANAGEMENT_URL = "http://guest:guest@mq.example:15672/"
    monkeypatch.setattr(management, "get", lambda path: answer)
    rows = cluster.nodes()
    if isinstance(answer, list):
        (row,) = rows
        assert (row.name, row.running, row.partitions, row.uptime) == ("['odd']", False, (), "")
    else:
        assert rows is None


def test_the_queues_page_shows_nodes_leaders_and_troubles_escaped(recorded, rf):
    from django.contrib.auth.models import AnonymousUser

    from messaging.web.context_processors import broker_status

    rows = cluster.nodes()
    queue = QueueRow(name="orders", ready=3, kind="quorum", node=RECORDED_QUEUE["leader"],
                     members=len(RECORDED_QUEUE["members"]), online=len(RECORDED_QUEUE["online"]))
    view = BrokerView(source="management", queues=[queue], exchanges=[], alarms=cluster.alarms(rows), nodes=rows)
    request = rf.get("/queues/")
    request.user = type("Staff", (), {"is_authenticated": True, "is_staff": False, "get_username": lambda s: "u"})()
    html = render_to_string("messaging/queues.html", {"view": view, **broker_status(request)}, request=request)
    assert "<script>x()</script>" not in html and "rabbit@c&lt;script&gt;x()&lt;/script&gt;" in html
    assert 'id="cluster-troubles"' in html and "node rabbit@b is down" in html
    assert "network partition: rabbit@a cannot reach rabbit@c" in html
    assert "blocking publishers (memory alarm on rabbit@c&lt;script&gt;" in html
    assert "rabbit@a <span class=\"helptext\">leader; 2/3 online</span>" in html and "replica offline" in html
    assert "1 replicated queue" in html  # rabbit@a leads one
    request.user = AnonymousUser()  # no node names for visitors, only that publishers are blocked
    anonymous = broker_status(request)
    assert anonymous == {"broker_blocked": True, "broker_alarms": [], "cluster_troubles": []}
