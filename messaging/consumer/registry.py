"""The worker registry: each `consume` process's row (`models.Worker`), its heartbeat and its counts."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future

from django.db import DatabaseError
from django.utils import timezone

from messaging.models import Worker

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0  # how often a running worker writes its heartbeat and counts
# The cycle collector while consuming: the youngest generation collected every 50,000 allocations
# rather than 700, and what was alive at the start left out of its walks (see `fewer_gc_passes`).
GC_THRESHOLDS = (50_000, 20, 100)


def register(queues: list[str]) -> int:
    """Write this process's row (running); first mark stopped the rows of this host's dead workers."""
    host = socket.gethostname()
    # Workers of this host that died without a clean exit (kill -9, OOM) still say 'running'.
    running = Worker.objects.filter(host=host, status=Worker.Status.RUNNING).values_list("pk", "pid", "heartbeat_at")
    for pk, pid, heartbeat_at in running:
        if pid != os.getpid() and not _process_exists(pid):
            Worker.objects.filter(pk=pk, status=Worker.Status.RUNNING).update(
                status=Worker.Status.STOPPED, stopped_at=heartbeat_at,
            )
            logger.info("worker %s:%s died without stopping; marked stopped", host, pid)
    return Worker.objects.create(host=host, pid=os.getpid(), queues=list(queues)).pk


def set_queues(worker_id: int, queues: list[str]) -> None:
    """Record the real names of the worker's queues (server-named ones are known once declared)."""
    Worker.objects.filter(pk=worker_id).update(queues=queues)


def save_counts(worker_id: int, *, acked: int, requeued: int, rejected: int, stopped: bool = False) -> None:
    """The heartbeat: the time and the worker's counts so far; `stopped` marks a clean exit."""
    extra = {"status": Worker.Status.STOPPED, "stopped_at": timezone.now()} if stopped else {}
    Worker.objects.filter(pk=worker_id).update(
        heartbeat_at=timezone.now(), acked=acked, requeued=requeued, rejected=rejected, **extra,
    )


class Heartbeat:
    """A running worker's heartbeat, written at most every HEARTBEAT_SECONDS by `submit` (a database
    thread that nobody waits for: neither a long handler nor a batch in flight holds it up)."""

    def __init__(self, submit: Callable[..., Future]) -> None:
        self._submit = submit
        self._last = 0.0
        self._saving: Future | None = None

    def beat(self, worker_id: int | None, counts) -> None:
        """Save `counts` (acked, requeued, rejected) if the last heartbeat is old enough and done."""
        now = time.monotonic()
        if worker_id is None or now - self._last < HEARTBEAT_SECONDS:
            return
        if self._saving is not None and not self._saving.done():
            return  # the last one still waits for the database: do not queue more behind it
        self._last = now
        self._saving = self._submit(_save, worker_id, acked=counts.acked, requeued=counts.requeued,
                                    rejected=counts.rejected)


def _save(worker_id: int, **counts) -> None:
    try:
        save_counts(worker_id, **counts)
    except DatabaseError as exc:
        logger.warning("worker heartbeat not saved: %s", exc)
        raise


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextlib.contextmanager
def fewer_gc_passes():
    """Tune Python's cycle collector for a stream of short-lived objects (a `consume` process's own).

    pika makes a few dozen objects per delivery and the recording a few more, all freed by their
    reference counts; with the default thresholds the collector also walked, now and then, every
    object Django and the app had loaded. Those are frozen out of its walks (`gc.freeze`, as
    long-running servers do after loading), and the youngest generation is collected less often.
    Cycles are still collected, later. Everything is restored on the way out.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
