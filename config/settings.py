"""Mailroom's only settings module: every value comes from the environment (or `.env`).

See `.env.example` for the variables and their defaults.
"""
import logging
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

# --- Core -------------------------------------------------------------------
DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str(
    "DJANGO_SECRET_KEY",
    default="django-insecure-local-development-key-set-DJANGO_SECRET_KEY-in-production",
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "drf_spectacular",  # the docs page's template
    "drf_spectacular_sidecar",  # Swagger UI's files, served from this site (no CDN)
    "axes",  # login throttling; its AccessAttempt and AccessFailureLog show in the admin
    "messaging",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "messaging.web.middleware.RefuseNulInQuery",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a refused login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "messaging.web.context_processors.broker_status",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    _sqlite_name = Path(DATABASES["default"]["NAME"])
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # Writers queue at BEGIN instead of failing mid-transaction; WAL lets the web
            # pages read while the worker writes.
            "transaction_mode": "IMMEDIATE",
            "timeout": env.float("MAILROOM_SQLITE_TIMEOUT", default=20.0),  # seconds a writer waits for the lock
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file, not :memory:, so that `consume` subprocesses in the tests share it.
    DATABASES["default"]["TEST"] = {"NAME": str(_sqlite_name.with_name(f"test_{_sqlite_name.name}"))}
else:
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    # A statement waiting for a row or table lock gives up after this long (PostgreSQL's
    # lock_timeout), as SQLite's writers do: the worker then treats the database as unavailable,
    # acks nothing and retries with backoff, instead of hanging behind the lock with pika unserviced.
    _pg_options = DATABASES["default"].setdefault("OPTIONS", {})
    _lock_ms = round(env.float("MAILROOM_PG_LOCK_TIMEOUT", default=20.0) * 1000)
    _pg_options["options"] = f"{_pg_options.get('options', '')} -c lock_timeout={_lock_ms}".strip()
    # psycopg prepares a statement once it ran this many times on a connection; Django leaves it off
    # for PgBouncer in transaction mode (before 1.22, or without max_prepared_statements). Only the
    # consumer's statements bind server-side and so can be prepared (Django's own are rendered client-side).
    if env.bool("MAILROOM_PG_PREPARED_STATEMENTS", default=True):
        _pg_options.setdefault("prepare_threshold", 5)
    else:
        _pg_options["prepare_threshold"] = None
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DJANGO_CONN_MAX_AGE", default=60))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth, i18n, static -----------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Logins (the admin's and /accounts/login/) are throttled by django-axes: after AXES_FAILURE_LIMIT
# failures for one username, or from one address, within AXES_COOLOFF_TIME, further attempts, right
# password or not, get the lockout page (429) until the cool-off has passed or `manage.py axes_reset`.
AUTHENTICATION_BACKENDS = ["config.auth.LoginThrottle", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env.int("MAILROOM_LOGIN_FAILURE_LIMIT", default=10)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("MAILROOM_LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # each on its own, not the pair
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False  # locked for the cool-off, not for as long as attempts go on
# Behind a proxy (DJANGO_SECURE_PROXY_SSL_HEADER) the address is the proxy's X-Forwarded-For entry.
AXES_CLIENT_IP_CALLABLE = "config.auth.client_address"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("DJANGO_TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("DJANGO_STATIC_ROOT", default=BASE_DIR / "staticfiles")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- Security -----------------------------------------------------------------
# Behind HTTPS set DJANGO_HTTPS=true: redirect to https, Secure cookies, HSTS. Off by default so
# that `make run` works on http://127.0.0.1:8000; `check --deploy` flags it until it is set.
_HTTPS = env.bool("DJANGO_HTTPS", default=False)
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=_HTTPS)
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=_HTTPS)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=_HTTPS)
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=31_536_000 if _HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=_HTTPS)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=_HTTPS)
# A TLS-terminating proxy in front (nginx, a load balancer) says so with X-Forwarded-Proto.
if env.bool("DJANGO_SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
# Content-Security-Policy (Django's own middleware): only this origin's scripts, styles and
# images; no inline script anywhere, so a `<script>` that slipped into a page would not run.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}
# Error pages (DEBUG) hide URL passwords (RABBITMQ_URL, DATABASE_URL in the environment) too.
DEFAULT_EXCEPTION_REPORTER_FILTER = "messaging.logging.SecretsExceptionReporterFilter"
DEFAULT_EXCEPTION_REPORTER = "messaging.logging.SecretsExceptionReporter"

# --- The HTTP API (messaging/web/api/ sets its own policies on its views) -------
# drf-spectacular reads these from settings only: the schema's title and version, and Swagger UI
# from drf-spectacular-sidecar's static files (a CDN would need the CSP widened).
SPECTACULAR_SETTINGS = {
    "TITLE": "Mailroom API",
    "VERSION": "1",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # `status` fields with different choices: name each set by its model.
    "ENUM_NAME_OVERRIDES": {"MessageStatusEnum": "messaging.models.Message.Status",
                            "DeliveryStatusEnum": "messaging.models.Delivery.Status"},
}

# --- RabbitMQ and Mailroom --------------------------------------------------
# Several brokers (a cluster) may be given, separated by commas; pika tries them in turn.
RABBITMQ_URL = env.str("RABBITMQ_URL", default="amqp://guest:guest@localhost:5672/%2F")
# The management HTTP API (e.g. http://guest:guest@localhost:15672/): queue depths, rates,
# bindings and the routing preview. Empty: Mailroom falls back to passive declares.
RABBITMQ_MANAGEMENT_URL = env.str("RABBITMQ_MANAGEMENT_URL", default="")
# How long a web request may wait on the broker (connect, blocked connection, confirm).
MAILROOM_PUBLISH_TIMEOUT = env.float("MAILROOM_PUBLISH_TIMEOUT", default=3.0)
# Largest body accepted by the form, the API and `manage.py publish`.
MAILROOM_MAX_BODY_BYTES = env.int("MAILROOM_MAX_BODY_BYTES", default=10 * 1024 * 1024)
# A pending letter is left to the web request that created it for this long before the relay
# takes it over (so the two never publish it at once).
MAILROOM_RELAY_GRACE_SECONDS = env.float("MAILROOM_RELAY_GRACE_SECONDS", default=10.0)
# Queue name -> dotted path of a handler callable run by `consume` for each letter.
MAILROOM_QUEUE_HANDLERS = env.json("MAILROOM_QUEUE_HANDLERS", default={})
# Prometheus sends `Authorization: Bearer <token>` to /metrics; empty: only logged-in staff may read it.
MAILROOM_METRICS_TOKEN = env.str("MAILROOM_METRICS_TOKEN", default="")
# Queues and exchanges Mailroom declares because they are missing survive a broker restart (true in
# production); false declares them as the RabbitMQ tutorials do, so that their code works beside Mailroom.
MAILROOM_DURABLE = env.bool("MAILROOM_DURABLE", default=False)

# DATA_UPLOAD_MAX_MEMORY_SIZE stays Django's: the publish form and the API read a letter's worth
# from a user who may publish, and only from one (messaging/web/uploads.py).

# --- Logging ----------------------------------------------------------------
# text: one line a record for people; json: one JSON object a line for a log collector, with the
# message_id and queue of the message a record is about.
_LOG_FORMAT = env.str("MAILROOM_LOG_FORMAT", default="text").strip().lower()
if _LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"MAILROOM_LOG_FORMAT must be text or json, not {_LOG_FORMAT!r}.")
if _LOG_FORMAT == "json":
    # Python's warnings (a deprecation, whitenoise's missing directory) become records of the
    # py.warnings logger, so that stderr stays one JSON object a line.
    logging.captureWarnings(True)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"mask_secrets": {"()": "messaging.logging.MaskSecretsFilter"}},
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "messaging.logging.SecretsJsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": _LOG_FORMAT,
            "filters": ["mask_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": env.str("DJANGO_LOG_LEVEL", default="INFO")},
    "loggers": {
        # pika logs a full traceback per failed reconnect; `consume` logs one line of its own.
        "pika": {"level": "CRITICAL"},
        # django-axes: lockouts (warnings), not its start-up line and every failed attempt.
        "axes": {"level": "WARNING"},
        # Django's own handlers have no mask filter: its records go to the root handler instead.
        "django": {"handlers": [], "level": "INFO", "propagate": True},
    },
}
