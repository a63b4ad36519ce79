"""Run a tutorial script (tests/tutorial/send.py, ...) unmodified against the tests' broker.

`python run.py SCRIPT`: pika.ConnectionParameters("localhost") becomes the first address of
RABBITMQ_URL (its host, port, credentials and vhost), so the tutorial's own lines stay as written.
"""
import os
import runpy
import sys
from pathlib import Path

import pika

_ConnectionParameters = pika.ConnectionParameters


def parameters(host="localhost", *args, **kwargs):
    if host == "localhost" and not args and not kwargs:
        url = (os.environ.get("RABBITMQ_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F").split(",")[0].strip()
        return pika.URLParameters(url)
    return _ConnectionParameters(host, *args, **kwargs)


pika.ConnectionParameters = parameters
runpy.run_path(str(Path(__file__).resolve().parent / sys.argv[1]), run_name="__main__")
