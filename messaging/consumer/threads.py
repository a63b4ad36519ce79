"""The worker's database threads: recorders that write batches, and one for the registry and the rest."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from django.db import (
    Error as DatabaseError,  # also InterfaceError: "connection already closed"
)
from django.db import close_old_connections
from django.db import connection as db_connection

CONNECTION_CHECK_SECONDS = 30.0  # how often each database thread applies CONN_MAX_AGE
# Batches recorded at once when no handler runs (handlers run one batch at a time): SQLite has one
# writer, where a third thread only adds to the GIL's traffic; PostgreSQL's backends work in parallel.
RECORDING_THREADS = {"sqlite": 2, "postgresql": 3}


class DatabaseThreads:
    """Executors of one thread each, every thread with its own database connection.

    The registry's thread also runs the worker's occasional writes, so that neither a long handler
    nor a batch in flight holds up the heartbeat.
    """

    def __init__(self, *, recorders: int) -> None:
        self.recorders = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mailroom-db{i}")
                          for i in range(recorders)]
        self._registry = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailroom-registry")
        self._checked_at: dict[int, float] = {}  # per thread: when CONN_MAX_AGE was last applied

    def record(self, recorder: ThreadPoolExecutor, fn: Callable, *args, **kwargs) -> Future:
        """Run `fn` on `recorder`'s thread."""
        return recorder.submit(self._run, fn, *args, **kwargs)

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        """Run `fn` on the registry's thread; nobody waits for it."""
        return self._registry.submit(self._run, fn, *args, **kwargs)

    def call(self, fn: Callable, *args, meanwhile: Callable[[], None], **kwargs):
        """Run `fn` on the registry's thread and return its result, calling `meanwhile` every second
        while it runs (the worker keeps its broker connection serviced)."""
        future = self.submit(fn, *args, **kwargs)
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                meanwhile()

    def close(self) -> None:
        """Close every thread's database connection and stop the threads."""
        for executor in (*self.recorders, self._registry):
            executor.submit(db_connection.close)
            executor.shutdown(wait=True)

    def _run(self, fn: Callable, *args, **kwargs):
        # CONN_MAX_AGE applied now and then, not per batch: reconnecting per batch costs more than recording it.
        now, thread = time.monotonic(), threading.get_ident()
        if now - self._checked_at.get(thread, 0.0) > CONNECTION_CHECK_SECONDS:
            self._checked_at[thread] = now
            close_old_connections()
        try:
            return fn(*args, **kwargs)
        except DatabaseError:
            db_connection.close()  # reconnect on the next call
            raise
