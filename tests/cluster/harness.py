"""The cluster tests' tools: the three nodes (scripts/cluster.sh), an outbox fed while faults happen,
the relay and workers as real subprocesses, and the checks every cluster test ends with."""
from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pika
from django.db import connections
from django.db.utils import load_backend
from django.utils import timezone

from messaging.models import Delivery, Message
from tests.conftest import ROOT, Process, wait_for

SCRIPT = ROOT / "scripts" / "cluster.sh"


@dataclass
class Cluster:
    """Three RabbitMQ nodes started by scripts/cluster.sh with `env` (ports, names, state directory)."""

    env: dict[str, str]
    variables: dict[str, str] = field(default_factory=dict)  # RABBITMQ_URL, _MANAGEMENT_URL, _NODENAME

    def script(self, *args: str, timeout: float = 240) -> str:
        out = subprocess.run([str(SCRIPT), *args], check=False, env={**os.environ, **self.env}, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, f"cluster.sh {' '.join(args)}: {out.stderr}"
        return out.stdout

    def up(self) -> None:
        for line in self.script("up").splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.variables[name] = value.strip("'")

    @property
    def url(self) -> str:
        return self.variables["RABBITMQ_URL"]

    @property
    def urls(self) -> list[str]:
        return self.url.split(",")

    def node(self, n: int) -> str:
        return self.variables["RABBITMQ_NODENAME"].replace("1@", f"{n}@")

    def ctl(self, n: int, *args: str, timeout: float = 60) -> str:
        return self.run("rabbitmqctl", "-q", "-n", self.node(n), *args, timeout=timeout)

    @staticmethod
    def run(*command: str, timeout: float = 60) -> str:
        out = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(command)}: {out.stderr}"
        return out.stdout

    def await_quorum_plus_one(self, n: int) -> None:
        """Wait until node n can stop with every quorum queue keeping a majority (RabbitMQ's upgrade guide)."""
        self.run("rabbitmq-upgrade", "-q", "-n", self.node(n), "await_online_quorum_plus_one", "-t", "60", timeout=90)

    def kill(self, n: int) -> None:
        self.script("kill", str(n))

    def stop(self, n: int) -> None:
        self.script("stop", str(n))

    def start(self, n: int) -> None:
        self.script("start", str(n))

    def isolate(self, n: int) -> None:
        self.script("isolate", str(n))

    def heal(self, n: int) -> None:
        self.script("heal", str(n))

    def is_running(self, n: int) -> bool:
        """Whether node n runs RabbitMQ (not only its Erlang VM: a paused minority node does not)."""
        out = subprocess.run(["rabbitmqctl", "-q", "-n", self.node(n), "eval", "rabbit:is_running()."],
                             check=False, capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and out.stdout.strip() == "true"

    def healthy(self) -> bool:
        """Every node running, without alarms or partitions, as the management API of the first node that answers says."""
        for n in (1, 2, 3):
            port = urlsplit(self.variables["RABBITMQ_MANAGEMENT_URL"]).port + n - 1  # node 1's, then the next
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/nodes")
            request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    nodes = json.load(response)
            except OSError:
                continue
            return len(nodes) == 3 and all(
                node["running"] and not node["mem_alarm"] and not node["disk_free_alarm"] and not node["partitions"]
                for node in nodes)
        return False

    def restore(self) -> None:
        """Every node healed, running and without alarms, whatever the test left behind."""
        if self.healthy():
            return
        for n in (1, 2, 3):
            if subprocess.run(["rabbitmqctl", "-q", "-n", self.node(n), "eval", "ok."], check=False,
                              capture_output=True, timeout=30).returncode != 0:
                self.start(n)
            else:
                self.heal(n)
                self.ctl(n, "set_disk_free_limit", "50MB")
        wait_for(lambda: all(self.is_running(n) for n in (1, 2, 3)), timeout=60, interval=0.5,
                 message="every node running")

    def queue_counts(self, queue: str) -> tuple[int, int] | None:
        """(ready, unacked) of `queue` as the first running node sees it; None when it does not exist."""
        n = next(n for n in (1, 2, 3) if self.is_running(n))
        for line in self.ctl(n, "list_queues", "--no-table-headers", "name", "messages_ready",
                             "messages_unacknowledged").splitlines():
            name, ready, unacked = line.split("\t")
            if name == queue:
                return int(ready), int(unacked)
        return None

    def connect(self) -> pika.BlockingConnection:
        """A connection to the first node that answers."""
        return pika.BlockingConnection([pika.URLParameters(u) for u in self.urls])

    def consumers(self, queue: str) -> int:
        try:
            connection = self.connect()
        except pika.exceptions.AMQPError:
            return 0
        try:
            return connection.channel().queue_declare(queue=queue, passive=True).method.consumer_count
        except pika.exceptions.AMQPError:
            return 0
        finally:
            if connection.is_open:
                connection.close()


def attach_database(alias: str, settings_dict: dict) -> None:
    """Open database `alias` in this thread only, outside settings.DATABASES (the throwaway PostgreSQL).

    Django's test cases allow such dynamically created connections in any thread; `detach_database` closes it.
    """
    connections[alias] = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias)


def detach_database(alias: str) -> None:
    connections[alias].close()
    del connections[alias]


class Outbox:
    """Writes pending letters for the relay on `queue`, `chunk` at a time, from a thread of its own,
    until stopped; on database `using` (`database`: its settings, when it is not in settings.DATABASES).
    Survives the database going away (it writes on when it is back)."""

    def __init__(self, queue: str, *, using: str = "default", database: dict | None = None, chunk: int = 15,
                 every: float = 0.1, limit: int = 100_000) -> None:
        self.queue, self.using, self.chunk, self.every, self.limit = queue, using, chunk, every, limit
        self.database = database
        self.prefix = f"cluster-{uuid.uuid4().hex[:8]}"
        self.ids: list[str] = []
        self.failures = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Outbox:
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.ids

    def _run(self) -> None:
        if self.database:
            attach_database(self.using, self.database)
        try:
            while not self._stop.is_set() and len(self.ids) < self.limit:
                try:
                    self.write(self.chunk)
                except Exception as exc:  # noqa: BLE001 — the database is restarting: write on when it is back
                    self.failures += 1
                    self.last_error = f"{exc.__class__.__name__}: {exc}"
                    connections[self.using].close()
                self._stop.wait(self.every)
        finally:
            if self.database:
                detach_database(self.using)
            else:
                connections[self.using].close()

    def write(self, count: int) -> None:
        now = timezone.now()
        letters = []
        for i in range(len(self.ids), len(self.ids) + count):
            letter = Message(message_id=f"{self.prefix}-{i}", routing_key=self.queue, status=Message.Status.PENDING,
                             next_attempt_at=now, origin=Message.Origin.API)
            letter.set_body(f"letter {i}".encode())
            letters.append(letter)
        Message.objects.using(self.using).bulk_create(letters)
        self.ids.extend(letter.message_id for letter in letters)


@dataclass
class Crew:
    """The relay and the workers of one test, all on the cluster."""

    relay: Process
    workers: list[Process]

    def stop(self) -> None:
        """SIGTERM to each: every one must exit 0 within seconds (nothing in hand left unrecorded)."""
        for p in [self.relay, *self.workers]:
            p.signal(signal.SIGTERM)
        for p in [self.relay, *self.workers]:
            assert p.wait(timeout=30) == 0, p.output[-4000:]

    def node_of(self, cluster: Cluster, process: Process) -> int:
        """The node (1–3) `process` last logged connecting to: processes spread over the nodes by pid."""
        lines = [line for line in process.output.splitlines() if "connected to RabbitMQ node=" in line]
        assert lines, process.output[-4000:]
        port = int(lines[-1].split("node=", 1)[1].split()[0].rsplit(":", 1)[1])
        return next(n for n, url in enumerate(cluster.urls, 1) if urlsplit(url).port == port)

    def reconnects(self) -> int:
        """Reconnects the workers logged when they stopped."""
        total = 0
        for p in self.workers:
            line = next(line for line in p.output.splitlines() if "consume stopped:" in line)
            total += int(line.rsplit("reconnects=", 1)[1].split()[0])
        return total


def start_crew(manage, cluster: Cluster, queue: str, *, env: dict[str, str], workers: int = 2) -> Crew:
    """`workers` workers on the quorum queue `queue` (declared by them), then the relay."""
    crew = [manage("consume", queue, "--queue-type", "quorum", "--heartbeat", "5", env=env) for _ in range(workers)]
    wait_for(lambda: cluster.consumers(queue) == workers, timeout=60, interval=0.2, message=f"{workers} consumers")
    relay = manage("relay", "--idle", "0.2", env=env)
    return Crew(relay=relay, workers=crew)


def settle(outbox: Outbox, queue: str, cluster: Cluster, *, timeout: float = 90) -> None:
    """Wait until every letter the outbox wrote is published and acked on `queue`, and the queue is
    empty (copies the relay published again, their confirms lost, are recorded too)."""
    ids = outbox.ids
    letters = Message.objects.using(outbox.using).filter(message_id__startswith=f"{outbox.prefix}-")
    acked = Delivery.objects.using(outbox.using).filter(queue=queue, status=Delivery.Status.ACKED)
    wait_for(lambda: letters.filter(status=Message.Status.PUBLISHED).count() == len(ids), timeout=timeout,
             interval=0.5, message="every letter published")
    wait_for(lambda: acked.values("message").distinct().count() == len(ids), timeout=timeout, interval=0.5,
             message="every letter acked")
    wait_for(lambda: cluster.queue_counts(queue) == (0, 0), timeout=timeout, interval=0.5, message="the queue empty")


def assert_nothing_lost(outbox: Outbox, queue: str, cluster: Cluster) -> dict:
    """Every letter published, recorded once as a Message with one acked delivery, the queue empty,
    nothing left 'received' (the queue is empty, so the broker holds none of them).

    Before a letter's first acked delivery come only requeued ones (redelivered by the broker); after
    it only acked copies: the relay publishes again what the broker received but never confirmed,
    and a worker's ack may be lost with its connection. Such a copy is marked a duplicate, unless two
    workers recorded two copies at the same moment (`concurrent`: neither saw the other's row).
    Attempt numbers rise, with gaps: a quorum queue counts the deliveries lost before their row was written.
    """
    letters = Message.objects.using(outbox.using).filter(message_id__startswith=f"{outbox.prefix}-")
    ids = dict(letters.values_list("pk", "message_id"))
    assert sorted(ids.values()) == sorted(outbox.ids), f"{len(outbox.ids) - len(ids)} letters not recorded"
    assert set(letters.values_list("status", flat=True)) == {Message.Status.PUBLISHED}
    trails = defaultdict(list)
    for d in Delivery.objects.using(outbox.using).filter(queue=queue).order_by("pk"):
        trails[d.message_id].append(d)
    assert set(trails) == set(ids), f"{len(set(ids) - set(trails))} letters never delivered"
    figures = {"letters": len(ids), "redelivered": 0, "duplicates": 0, "concurrent": 0}
    for pk, trail in trails.items():
        summary = f"{ids[pk]}: {[(d.attempt, d.status, d.redelivered, d.duplicate) for d in trail]}"
        first = next((i for i, d in enumerate(trail) if d.status == Delivery.Status.ACKED), None)
        assert first is not None and not trail[first].duplicate, summary
        assert all(d.status == Delivery.Status.REQUEUED for d in trail[:first]), summary
        assert all(d.status == Delivery.Status.ACKED for d in trail[first + 1:]), summary
        assert all(a.attempt < b.attempt for a, b in itertools.pairwise(trail[:first + 1])), summary
        figures["redelivered"] += sum(d.redelivered for d in trail)
        figures["duplicates"] += sum(d.duplicate for d in trail[first + 1:])
        figures["concurrent"] += sum(not d.duplicate for d in trail[first + 1:])
    counts = cluster.queue_counts(queue)
    assert counts == (0, 0), f"queue {queue} not empty: ready, unacked = {counts}"
    return figures


def published_between(outbox: Outbox, start, end) -> int:
    """Letters of `outbox` the broker confirmed between two datetimes."""
    return Message.objects.using(outbox.using).filter(
        message_id__startswith=f"{outbox.prefix}-", published_at__gt=start, published_at__lt=end).count()


def monotonic_wait(seconds: float) -> None:
    """A fault's planned duration (a partition held for 10 s): not a timing assertion."""
    time.sleep(seconds)
