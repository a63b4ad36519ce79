"""Past one machine, what operators see: workers spread over RABBITMQ_URL's nodes and log theirs, move to a
surviving node within seconds, and the pages show the nodes, quorum queue leaders, alarms.

Two brokers: the shared node of RABBITMQ_URL (never stopped nor alarmed here) and a node of this
module's own (`own_node`: its own ports, name and directories), which is stopped and alarmed.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pika
import pytest
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone

from messaging.amqp import management
from messaging.models import Delivery, Message
from tests.conftest import (
    management_api,
    management_url,
    queue_depth,
    rabbitmq_url,
    rabbitmq_vhost,
    subprocess_env,
    wait_for,
)

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.django_db(transaction=True)

OWN_NODE = "mailroom-nodes-test@localhost"
# Clear of the shared node (5672) and of scripts/cluster.sh's nodes (5691-5693).
OWN_PORT, OWN_MANAGEMENT_PORT, OWN_DIST_PORT = 5781, 15781, 25781
CONNECTED = "connected to RabbitMQ node="


@dataclass(frozen=True)
class OwnNode:
    url: str
    management_url: str
    address: str  # host:port, as the workers log it

    def ctl(self, *args: str, timeout: float = 90) -> str:
        out = subprocess.run(["rabbitmqctl", "-n", OWN_NODE, *args], capture_output=True, text=True,
                             timeout=timeout, check=False)
        assert out.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.stderr}"
        return out.stdout

    def api(self, path: str):
        request = urllib.request.Request(f"http://127.0.0.1:{OWN_MANAGEMENT_PORT}/api/{path}")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def consumers(self, queue: str) -> int:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            return connection.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            if connection.is_open:
                connection.close()


@pytest.fixture(scope="module")
def own_node():
    """A single RabbitMQ node of this module's own (AMQP 5781, management 15781), stopped afterwards."""
    server = shutil.which("rabbitmq-server") or ("/usr/sbin/rabbitmq-server" if Path("/usr/sbin/rabbitmq-server").exists()
                                                 else None)
    if server is None or shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmq-server is not installed here: the tests of a second node need it")
    base = Path(tempfile.mkdtemp(prefix="mailroom-nodes-"))
    base.chmod(0o777)  # the server may run as the rabbitmq user
    (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {OWN_PORT}\n"
                                        f"management.tcp.port = {OWN_MANAGEMENT_PORT}\n"
                                        "collect_statistics_interval = 500\n")  # alarms in the API sooner
    (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
    env = {**os.environ, "RABBITMQ_NODENAME": OWN_NODE, "RABBITMQ_NODE_PORT": str(OWN_PORT),
           "RABBITMQ_DIST_PORT": str(OWN_DIST_PORT), "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
           "RABBITMQ_LOG_BASE": str(base / "log"), "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"), "RABBITMQ_PID_FILE": str(base / "pid"),
           "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config")}
    with open(base / "server.log", "wb") as log:
        server_process = subprocess.Popen([server], env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
    node = OwnNode(url=f"amqp://guest:guest@127.0.0.1:{OWN_PORT}/%2F",
                   management_url=f"http://guest:guest@127.0.0.1:{OWN_MANAGEMENT_PORT}/", address=f"127.0.0.1:{OWN_PORT}")
    try:
        def started() -> bool:  # its management API and AMQP both answer (cheaper to ask than rabbitmqctl)
            assert server_process.poll() is None, (base / "server.log").read_text(errors="replace")[-3000:]
            try:
                node.api("nodes")
                pika.BlockingConnection(pika.URLParameters(node.url)).close()
                return True
            except (OSError, pika.exceptions.AMQPError):
                return False
        wait_for(started, timeout=120, interval=0.5, message="the own node to start")
        yield node
    finally:
        subprocess.run(["rabbitmqctl", "-n", OWN_NODE, "stop"], capture_output=True, timeout=60, check=False)
        try:
            server_process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server_process.pid, 9)
            server_process.wait()
        shutil.rmtree(base, ignore_errors=True)


def pending_letters(queue: str, count: int) -> None:
    for i in range(count):
        letter = Message(routing_key=queue, status=Message.Status.PENDING, next_attempt_at=timezone.now(),
                         origin=Message.Origin.API)
        letter.set_body(f"letter {i}".encode())
        letter.save()


def address(url: str) -> str:
    split = urlsplit(url)
    return f"{split.hostname}:{split.port or 5672}"


def first_address(pid: int, count: int) -> int:
    """The address a process of this pid starts at, on this host (see `messaging.amqp.connection.Nodes`)."""
    return (pid + zlib.crc32(socket.gethostname().encode())) % count


def connected_to(worker) -> list[str]:
    return [line.split(CONNECTED, 1)[1].split()[0] for line in worker.output.splitlines() if CONNECTED in line]


@pytest.mark.node
def test_workers_spread_over_the_nodes_and_move_to_a_survivor_within_seconds(own_node, queue_name, manage, amqp):
    addresses = [rabbitmq_url(), own_node.url]
    shared, own = address(addresses[0]), own_node.address
    env = subprocess_env(RABBITMQ_URL=",".join(addresses))
    workers = []
    # Processes take the addresses in turn by pid: start workers until both addresses have one (two, mostly).
    while len({first_address(w.proc.pid, 2) for w in workers}) < 2 and len(workers) < 8:
        workers.append(manage("consume", queue_name, "--inactivity-timeout", "60", env=env))
    for worker in workers:
        wait_for(lambda w=worker: "consuming queues=" in w.output, timeout=30, message="each worker to consume")

    on = [connected_to(w) for w in workers]
    assert on == [[address(addresses[first_address(w.proc.pid, 2)])] for w in workers], on
    assert {node for nodes in on for node in nodes} == {shared, own}  # not all on the first address
    # The brokers agree with the logs: each node has the consumers the logs put there.
    moving = [w for w, nodes in zip(workers, on, strict=True) if nodes == [own]]
    assert own_node.consumers(queue_name) == len(moving) >= 1
    wait_for(lambda: queue_depth(queue_name)[1] == len(workers) - len(moving), timeout=10,
             message="the shared node's consumers")

    stopped = time.monotonic()  # rabbitmqctl itself takes a few seconds: the figure is an upper bound
    own_node.ctl("stop_app")
    try:
        wait_for(lambda: all(len(connected_to(w)) == 2 for w in moving), timeout=20, interval=0.1,
                 message="the own node's workers to reconnect")
        moved = time.monotonic() - stopped
        assert all(connected_to(w) == [own, shared] for w in moving), [w.output[-2000:] for w in moving]
        wait_for(lambda: queue_depth(queue_name)[1] == len(workers), timeout=10, message="every worker on the shared node")
    finally:
        own_node.ctl("start_app")
    assert moved < 10, f"reconnected after {moved:.1f}s"
    logger.info("%s of %s workers on the stopped node consumed from the other within %.1fs of running stop_app",
                len(moving), len(workers), moved)
    assert all("connection lost" in w.output and w.proc.poll() is None for w in moving)
    for i in range(len(workers)):
        amqp.basic_publish("", queue_name, f"after the move {i}".encode())
    wait_for(lambda: Delivery.objects.filter(queue=queue_name, status=Delivery.Status.ACKED).count() == len(workers),
             timeout=20, message="the letters sent to the surviving node to be recorded and acked")


def test_the_relay_logs_the_node_it_publishes_to(manage, amqp, queue_name):
    amqp.queue_declare(queue_name, durable=True)
    pending_letters(queue_name, 2)
    shared = rabbitmq_url()
    relay = manage("relay", "--once", env=subprocess_env(RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:1/%2F,{shared}"))
    assert relay.wait(timeout=60) == 0, relay.output
    assert connected_to(relay) == [address(shared)], relay.output
    line = next(line for line in relay.output.splitlines() if CONNECTED in line)
    assert "client=mailroom-relay" in line and "guest" not in line
    assert queue_depth(queue_name) == (2, 0)


@pytest.mark.node
def test_a_memory_alarm_on_a_node_shows_on_every_page_and_in_its_row(own_node, admin_client, settings):
    settings.RABBITMQ_MANAGEMENT_URL = own_node.management_url
    own_node.ctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        wait_for(lambda: own_node.api("nodes")[0].get("mem_alarm"), timeout=30, message="the memory alarm")
        cache.clear()
        queues_page = admin_client.get(reverse("queues")).content.decode()
        dashboard = admin_client.get(reverse("dashboard")).content.decode()
    finally:
        own_node.ctl("set_vm_memory_high_watermark", "0.4")
    alarm = f"memory alarm on {OWN_NODE}"
    assert f"blocking publishers ({alarm})" in queues_page and f"blocking publishers ({alarm})" in dashboard
    nodes_table = queues_page.split('id="nodes"', 1)[1].split("</table>", 1)[0]
    assert OWN_NODE in nodes_table and alarm in nodes_table and "running" in nodes_table
    assert alarm in dashboard.split('id="cluster-nodes"', 1)[1].split("</section>", 1)[0]
    assert 'id="cluster-troubles"' not in queues_page  # an alarm, not a node down or a partition

    wait_for(lambda: not own_node.api("nodes")[0]["mem_alarm"], timeout=30, message="the alarm to clear")
    cache.clear()
    cleared = admin_client.get(reverse("queues")).content.decode()
    assert "blocking publishers" not in cleared and "Alarms: none" in cleared


def test_the_shared_node_shows_running_with_the_leader_of_a_quorum_queue(admin_client, settings, amqp, queue_name,
                                                                         monkeypatch):
    settings.RABBITMQ_MANAGEMENT_URL = management_url()
    asked = []
    monkeypatch.setattr(management, "nodes", lambda real=management.nodes: asked.append(1) or real())
    amqp.queue_declare(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    listed = wait_for(lambda: (q := management_api(f"queues/{rabbitmq_vhost()}/{quote(queue_name, safe='')}"))
                      .get("leader") and q, timeout=15, message="the queue's leader")
    leader = listed["leader"]
    names = [n["name"] for n in management_api("nodes")]

    response = admin_client.get(reverse("queues"))
    assert len(asked) == 1  # the banner and the page share one /api/nodes answer
    view = response.context["view"]
    html = response.content.decode()
    assert [n.name for n in view.nodes] == sorted(names) and all(n.running for n in view.nodes)
    row = next(q for q in view.queues if q.name == queue_name)
    assert (row.node, row.members, row.online) == (leader, len(listed["members"]), len(listed["online"]))
    assert f"{leader} <span class=\"helptext\">leader;" in html
    assert 'id="cluster-troubles"' not in html and "Alarms: none" in html
    assert any(n.name == leader and leads >= 1 for n, leads in view.node_leads)
    cache.clear()
    dashboard = admin_client.get(reverse("dashboard")).content.decode()
    assert len(asked) == 2
    assert leader in dashboard.split('id="cluster-nodes"', 1)[1].split("</section>", 1)[0]
