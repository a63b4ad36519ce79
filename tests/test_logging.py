"""MAILROOM_LOG_FORMAT=json: real processes log one JSON object a line; a worker's name the message and queue."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT, subprocess_env, wait_for
from tests.consuming_checks import publish

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_worker_logs_json_lines_that_name_the_message(queue_name, tmp_path):
    [message_id] = publish(queue_name, 1, prefix="json-log", declare=True)
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        # A handler that fails, no retry: the delivery is rejected, and the failure logged for this message.
        worker = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), "consume", queue_name, "--handler", "tests.handlers.fail",
             "--max-retries", "0", "--max-messages", "1", "--inactivity-timeout", "20"], check=False,
            cwd=ROOT, env=subprocess_env(MAILROOM_LOG_FORMAT="json"), stdout=out, stderr=err, timeout=60,
        )
    lines = stderr.read_text().splitlines()
    assert worker.returncode == 0, "\n".join(lines)
    assert lines, "the worker logged nothing"
    records = []
    for line in lines:
        record = json.loads(line)  # every line, not only ours: Django's and pika's too
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    [failed] = [r for r in records if "handler failed" in r["message"]]
    assert failed["level"] == "WARNING" and failed["logger"] == "messaging.consumer.handlers"
    assert failed["message_id"] == message_id
    assert failed["queue"] == queue_name
    assert "action=rejected" in failed["message"]  # the text of text mode, unchanged
    assert any(r["message"].startswith("consuming queues=") for r in records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gunicorn_logs_json_lines_too(tmp_path):
    """gunicorn.conf.py: the web's own lines (start-up, workers, access) are JSON as well, and so
    are Python's warnings (whitenoise warns of a static directory that is not there)."""
    port = free_port()
    env = subprocess_env(MAILROOM_LOG_FORMAT="json", DJANGO_STATIC_ROOT=str(tmp_path / "not-collected"))
    output = tmp_path / "gunicorn.log"
    with output.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "config.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--access-logfile", "-", "--no-control-socket"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthz"), timeout=30, message="gunicorn to answer")
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=30)
    lines = output.read_text().splitlines()
    assert code == 0, "\n".join(lines)
    records = [json.loads(line) for line in lines]  # every line
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records), lines
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "gunicorn.access", "py.warnings"} <= loggers, lines
    assert any("GET /healthz" in r["message"] for r in records if r["logger"] == "gunicorn.access")


def answers(url: str) -> bool:
    """Whether the server answered at all (/healthz may say 503: the answer is what counts here)."""
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        time.sleep(0.2)
        return False
    return True
