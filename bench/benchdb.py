"""The benchmarks' own database: a throwaway SQLite file by default, or DATABASE_URL's PostgreSQL
database, created when missing. Call before `django.setup()`."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def use_bench_database(sqlite_name: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "DATABASE_URL" not in os.environ:
        db = RESULTS / sqlite_name
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        os.environ["DATABASE_URL"] = f"sqlite:///{db}"
    elif os.environ["DATABASE_URL"].startswith("postgres"):
        import psycopg

        name = urlsplit(os.environ["DATABASE_URL"]).path.lstrip("/")
        admin_url = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url.replace("postgres://", "postgresql://", 1), autocommit=True) as pg:
            if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                pg.execute(f'CREATE DATABASE "{name}"')
