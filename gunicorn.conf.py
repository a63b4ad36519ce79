"""gunicorn's own settings, read from the working directory: its log lines in Mailroom's format.

With MAILROOM_LOG_FORMAT=json (from the environment or `.env`, as config/settings.py reads it),
gunicorn's start-up, worker and access lines are JSON objects too, through the same password mask;
Django's records already are. With text, gunicorn keeps its own format.
"""
import os
from pathlib import Path

import environ

environ.Env.read_env(Path(__file__).resolve().parent / ".env", overwrite=False)

if os.environ.get("MAILROOM_LOG_FORMAT", "text").strip().lower() == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"mask_secrets": {"()": "messaging.logging.MaskSecretsFilter"}},
        "formatters": {"json": {"()": "messaging.logging.SecretsJsonFormatter"}},
        "handlers": {
            "error": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["mask_secrets"],
                      "stream": "ext://sys.stderr"},
            # --access-logfile - writes to stdout, as gunicorn does.
            "access": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["mask_secrets"],
                       "stream": "ext://sys.stdout"},
        },
        "root": {"level": "INFO", "handlers": ["error"]},
        "loggers": {
            # Not propagated: Django's LOGGING gives the root logger a handler of its own in each worker.
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }
