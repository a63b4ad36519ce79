"""The wheel: Mailroom `pip install`ed into another Django project migrates, publishes and consumes there.

The wheel is built from a copy of the working tree (as from a clean clone) and installed into a
throwaway venv that borrows the dependencies from this venv (a .pth file), so that the test needs no
network for them; `pip check` proves the wheel's declared dependencies are met by what it borrows.
The project runs from its own directory, never the repository's, so `messaging` is the wheel's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

from django.db import connection
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT, delete_queue, rabbitmq_url

# What a clone would not hold: local environments, caches, databases and earlier builds.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", "staticfiles", "*.sqlite3*",
    ".pytest_cache", "test-artifacts", ".env",
)
# Every Requires-Dist the app needs at run time (psycopg is the `postgres` extra).
REQUIRED = {"django", "pika", "djangorestframework", "drf-spectacular", "drf-spectacular-sidecar", "prometheus-client"}

SETTINGS = """\
SECRET_KEY = "a-throwaway-key-for-the-package-test-0123456789-abcdefghijklmnop"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "messaging",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "messaging.web.middleware.RefuseNulInQuery",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "host.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
        "messaging.web.context_processors.broker_status",
    ]},
}]
DATABASES = {"default": %(database)r}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"
RABBITMQ_URL = %(rabbitmq_url)r
"""

URLS = """\
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("mailroom/", include("messaging.web.urls")),
]
"""

MANAGE = """\
import os
import sys

from django.core.management import execute_from_command_line

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "host.settings")
execute_from_command_line(sys.argv)
"""

# Run by `manage.py shell -c` in the host project: the letter and its deliveries, and a page rendered.
PROBE = """\
import json
from django.contrib.auth.models import User
from django.test import Client
from messaging.models import Message
message = Message.objects.get(message_id=%(message_id)r)
client = Client()
client.force_login(User.objects.create_superuser("host-admin", "admin@example.com", "pw"))
page = client.get("/mailroom/messages/%(message_id)s/")
print(json.dumps({
    "status": message.status,
    "deliveries": [d.status for d in message.deliveries.all()],
    "page": page.status_code,
    "page_names_the_letter": %(message_id)r in page.content.decode(),
    "stylesheet": "/static/messaging/mailroom.css" in page.content.decode(),
}))
"""


def run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run `args`; its standard output, or the test fails with both of its outputs."""
    out = subprocess.run([str(a) for a in args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def build_wheel(tmp_path: Path) -> Path:
    """The wheel `pip wheel --no-deps` builds from a copy of the working tree."""
    source = tmp_path / "clone"
    shutil.copytree(ROOT, source, ignore=NOT_IN_A_CLONE)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp_path / "dist", source], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("django_mailroom-*.whl")
    return wheel


def assert_holds_the_app_alone(wheel: Path) -> None:
    """Every file of messaging/ (templates, static files, migrations, commands), nothing else of the repository."""
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    app_files = {
        path.relative_to(ROOT).as_posix() for path in (ROOT / "messaging").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert {"messaging/templates/messaging/base.html", "messaging/static/messaging/mailroom.css",
            "messaging/migrations/0001_initial.py", "messaging/management/commands/consume.py"} <= app_files
    assert sorted(app_files - names) == [], "files of the app missing from the wheel"
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"messaging"}, tops  # no config/, tests/, ...

    (metadata,) = (name for name in names if name.endswith(".dist-info/METADATA"))
    requires = [Requirement(line.split(":", 1)[1]) for line in archive.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    assert {canonicalize_name(r.name) for r in requires if r.marker is None} == REQUIRED, requires
    extras = [(r.name, r.extras, str(r.marker)) for r in requires if r.marker is not None]
    assert extras == [("psycopg", {"binary"}, 'extra == "postgres"')], requires


def install(wheel: Path, venv: Path) -> Path:
    """A venv holding the wheel, with this venv's packages for its dependencies; its python."""
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv).strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
        cwd=venv)
    # Exit code 1 when any package on the path misses a dependency: only the wheel's are this test's.
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"],
                           check=False, cwd=venv, capture_output=True, text=True, timeout=60)
    ours = [line for line in check.stdout.splitlines() if line.lower().startswith("django-mailroom ")]
    assert ours == [], "the wheel's declared dependencies are not met:\n" + "\n".join(ours)
    return python


def postgres_server() -> dict:
    """psycopg's connection arguments for the tests' PostgreSQL server, its `postgres` database."""
    tests = connection.settings_dict
    return {"host": tests["HOST"] or "127.0.0.1", "port": tests["PORT"] or 5432, "user": tests["USER"],
            "password": tests["PASSWORD"] or None, "dbname": "postgres"}


def host_database(tmp_path: Path) -> tuple[dict, str | None]:
    """The host project's database, of the tests' kind (a SQLite file or a new PostgreSQL database); the new name."""
    if connection.vendor == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "host.sqlite3")}, None
    import psycopg

    name = f"mailroom_package_{uuid.uuid4().hex[:10]}"
    server = postgres_server()
    with psycopg.connect(**server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": name, "USER": server["user"],
                "PASSWORD": server["password"] or "", "HOST": server["host"], "PORT": str(server["port"])}
    return database, name


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(**postgres_server(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_project(project: Path, *, database: dict) -> None:
    (project / "host").mkdir(parents=True)
    (project / "host" / "__init__.py").write_text("")
    (project / "host" / "settings.py").write_text(SETTINGS % {"database": database, "rabbitmq_url": rabbitmq_url()})
    (project / "host" / "urls.py").write_text(URLS)
    (project / "manage.py").write_text(MANAGE)


def test_the_wheel_installs_into_another_project_that_then_publishes_and_consumes(tmp_path):
    wheel = build_wheel(tmp_path)
    assert_holds_the_app_alone(wheel)
    venv = tmp_path / "venv"
    python = install(wheel, venv)

    project = tmp_path / "project"
    database, throwaway = host_database(tmp_path)
    queue = f"t-package-{uuid.uuid4().hex[:8]}"
    message_id = f"package-{uuid.uuid4().hex[:8]}"
    # Nothing of the repository's: no PYTHONPATH, no config.settings, no DATABASE_URL or RABBITMQ_URL.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "DATABASE_URL", "RABBITMQ_URL")}
    env["PYTHONUNBUFFERED"] = "1"

    def manage(*args: str, timeout: float = 120) -> str:
        return run([python, "manage.py", *args], cwd=project, env=env, timeout=timeout)

    try:
        write_project(project, database=database)
        where = run([python, "-c", "import messaging; print(messaging.__file__)"], cwd=project, env=env).strip()
        assert Path(where).resolve().is_relative_to(venv.resolve()), where

        checked = manage("check", "--fail-level", "WARNING")
        assert "no issues" in checked
        assert str(venv) in manage("findstatic", "messaging/mailroom.css")  # the wheel's static files
        manage("migrate", "--noinput", "-v0")
        published = manage("publish", queue, "hello from another project", "--declare", "--message-id", message_id)
        assert published.split() == [message_id, "published"], published
        manage("consume", queue, "--max-messages", "1", "--inactivity-timeout", "30", timeout=60)

        recorded = json.loads(manage("shell", "-c", PROBE % {"message_id": message_id}).strip().splitlines()[-1])
        assert recorded == {"status": "published", "deliveries": ["acked"], "page": 200,
                            "page_names_the_letter": True, "stylesheet": True}
    finally:
        delete_queue(queue)
        if throwaway:
            drop_database(throwaway)
