"""Scale benchmark: each audit page's time with 1,000,000 letters against its time with 10,000.

    .venv/bin/python bench/seed.py --letters 10000 --database mailroom_scale_10k
    .venv/bin/python bench/seed.py --letters 1000000 --database mailroom_scale
    .venv/bin/python bench/scale.py

Each page is rendered in-process with Django's test client (no HTTP server in the way), by one
subprocess per database (Django's settings are per process). The two are asked in turn, page by
page, so that other load on the machine hits both sizes alike: 3 warm-up requests, then --repeat
timed ones each. Prints the best and the median time at both sizes, their ratios and the queries
each page ran; exits 1 when a best-of ratio is above --max-ratio (2.0, issue #5). The broker
parts (dashboard) use the management API (RABBITMQ_MANAGEMENT_URL, default the local one).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
logger = logging.getLogger("bench.scale")


def pages(n: int) -> list[tuple[str, str]]:
    """(name, url) of every page measured; the letter looked at sits in the middle of the history."""
    from django.urls import reverse

    from messaging.models import Message

    middle = Message.objects.get(message_id=f"bench-{n // 2 + 5}")
    newest = Message.objects.order_by("-created_at").only("created_at").first().created_at
    admin_list = reverse("admin:messaging_message_changelist")
    deliveries = reverse("admin:messaging_delivery_changelist")
    return [
        ("admin letters", admin_list),
        ("admin letters ?status=failed", admin_list + "?status=failed"),
        ("admin letters ?origin=api", admin_list + "?origin=api"),
        ("admin letters ?exchange=bench.topic", admin_list + "?exchange=bench.topic"),
        ("admin letters ?queue=bench.q7.a", admin_list + "?queue=bench.q7.a"),
        ("admin letters ?delivery_status=rejected", admin_list + "?delivery_status=rejected"),
        ("admin letters search message_id", admin_list + f"?q={middle.message_id}"),
        ("admin letters search routing key", admin_list + "?q=bench.q3"),
        ("admin letters date hierarchy (month)", admin_list + f"?created_at__year={newest.year}&created_at__month={newest.month}"),
        ("admin letters page 10", admin_list + "?p=10"),
        ("admin letter page", reverse("admin:messaging_message_change", args=[middle.pk])),
        ("admin deliveries", deliveries),
        ("admin deliveries ?status=rejected", deliveries + "?status=rejected"),
        ("admin deliveries ?queue=bench.q7.b", deliveries + "?queue=bench.q7.b"),
        ("admin deliveries search message_id", deliveries + f"?q={middle.message_id}"),
        ("/messages/", reverse("message-list")),
        ("/messages/?status=failed", reverse("message-list") + "?status=failed"),
        ("/messages/?queue=bench.q7.a", reverse("message-list") + "?queue=bench.q7.a"),
        ("/messages/?q=message_id", reverse("message-list") + f"?q={middle.message_id}"),
        ("/messages/<id>/", reverse("message-detail", args=[middle.message_id])),
        # Words: a number in one letter's body and headers, and a word in every body.
        ("admin letters search a rare word", admin_list + f"?q={n // 2 + 5}"),
        ("admin letters search a word in all", admin_list + "?q=letter"),
        ("/messages/?q=a rare word", reverse("message-list") + f"?q={n // 2 + 5}"),
        ("/messages/?q=a word in all", reverse("message-list") + "?q=letter"),
        ("/api/messages/?search=a rare word", reverse("api-messages") + f"?search={n // 2 + 5}"),
        ("/api/messages/?search=a word in all", reverse("api-messages") + "?search=letter"),
        ("dashboard /", reverse("dashboard")),
        ("/metrics", reverse("metrics")),
    ]


def serve(database: str) -> None:
    """Subprocess side: set up Django on one database, then time each URL read from stdin."""
    os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{database}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "testserver")
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, override_settings

    from messaging.models import Message

    # Pages render without `collectstatic` (as in the tests).
    override_settings(STORAGES={**settings.STORAGES, "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}).enable()
    n = Message.objects.order_by("-id").values_list("id", flat=True).first()
    user, _ = User.objects.get_or_create(username="bench", defaults={"is_staff": True, "is_superuser": True})
    client = Client()
    client.force_login(user)
    sys.stdout.write(json.dumps({"letters": n, "pages": pages(n)}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        url = request["url"]
        if request.get("queries"):
            with CaptureQueriesContext(connection) as queries:
                status = client.get(url).status_code
            reply = {"queries": len(queries), "status": status}
        else:
            started = time.perf_counter()
            status = client.get(url).status_code
            reply = {"seconds": time.perf_counter() - started, "status": status}
        if status != 200:
            raise SystemExit(f"{url} answered {status}")
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return


class Server:
    def __init__(self, database: str, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", database], env=env, cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the benchmark subprocess exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, url: str, *, queries: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"url": url, "queries": queries}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description="Audit pages at 10k vs 1M letters.")
    parser.add_argument("--small", default="mailroom_scale_10k")
    parser.add_argument("--large", default="mailroom_scale")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--max-ratio", type=float, default=2.0)
    parser.add_argument("--only", default="", help="only the pages whose name holds this text")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = {**os.environ, "DJANGO_LOG_LEVEL": "ERROR",
           "RABBITMQ_MANAGEMENT_URL": os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/")}
    small, large = Server(args.small, env), Server(args.large, env)
    logger.info("%-40s %21s %21s %13s %9s", "page", f"{small.hello['letters']:,} letters",
                f"{large.hello['letters']:,} letters", "ratio", "queries")
    logger.info("%-40s %21s %21s %13s", "", "best / median", "best / median", "best / median")
    worst = 0.0
    for (name, url_small), (_, url_large) in zip(small.hello["pages"], large.hello["pages"]):
        if args.only not in name:
            continue
        times: dict[str, list[float]] = {"small": [], "large": []}
        for _ in range(3):  # warm up: caches, connections, the planner's statistics
            small.ask(url_small)
            large.ask(url_large)
        for _ in range(args.repeat):  # interleaved, so that load on the machine hits both alike
            times["small"].append(small.ask(url_small)["seconds"])
            times["large"].append(large.ask(url_large)["seconds"])
        best = {k: min(v) for k, v in times.items()}
        median = {k: statistics.median(v) for k, v in times.items()}
        ratio, ratio_median = best["large"] / best["small"], median["large"] / median["small"]
        worst = max(worst, ratio)
        logger.info("%-40s %8.1f / %6.1f ms %8.1f / %6.1f ms %5.2fx / %4.2fx %4d/%-4d%s", name,
                    best["small"] * 1000, median["small"] * 1000, best["large"] * 1000, median["large"] * 1000,
                    ratio, ratio_median, small.ask(url_small, queries=True)["queries"],
                    large.ask(url_large, queries=True)["queries"], "  <-- over" if ratio > args.max_ratio else "")
    small.close()
    large.close()
    logger.info("worst ratio (best of %s) %.2fx (target <= %.1fx)", args.repeat, worst, args.max_ratio)
    sys.exit(0 if worst <= args.max_ratio else 1)


if __name__ == "__main__":
    main()
