"""Mailroom's only settings module: every value comes from the environment (or `.env`).

See `.env.example` for the variables and their defaults.
"""
from pathlib import Path

import environ

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
    "messaging",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
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
                "messaging.context_processors.broker_status",
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
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file, not :memory:, so that `consume` subprocesses in the tests share it.
    DATABASES["default"]["TEST"] = {"NAME": str(_sqlite_name.with_name(f"test_{_sqlite_name.name}"))}
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DJANGO_CONN_MAX_AGE", default=60))
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth, i18n, static -----------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("DJANGO_TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
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

# Request bodies may carry a base64 body of MAILROOM_MAX_BODY_BYTES plus the form's fields.
DATA_UPLOAD_MAX_MEMORY_SIZE = MAILROOM_MAX_BODY_BYTES * 4 // 3 + 1024 * 1024

# --- Logging ----------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"mask_secrets": {"()": "messaging.logging.MaskSecretsFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["mask_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": env.str("DJANGO_LOG_LEVEL", default="INFO")},
    "loggers": {
        "pika": {"level": "WARNING"},
    },
}
