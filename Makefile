# Mailroom — `make run` runs the whole post office, `make test` runs the tests (SQLite, then PostgreSQL).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/mailroom
SQLITE_URL  := sqlite:///$(CURDIR)/db.sqlite3

.PHONY: setup run test test-sqlite test-postgres services check-python bench clean

check-python:
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 12) else "Mailroom needs Python >= 3.12 (Django 6); $(PYTHON) is %d.%d. Install one (e.g. pyenv install 3.12) or run make PYTHON=python3.12 ..." % v[:2])'

$(VENV)/.installed: requirements.txt | check-python
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then echo "Recreating $(VENV): it was made with a Python older than 3.12"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

setup: check-python $(VENV)/.installed

services:
	@scripts/services.sh rabbitmq

# The whole post office: web (gunicorn) + `consume hello` + the relay, under honcho; Ctrl-C stops all.
run: setup services
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py ensure_admin
	@echo "Mailroom: http://$${MAILROOM_BIND:-127.0.0.1:8000}/ (web, worker for the queue 'hello', relay). Ctrl-C stops them all."
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/honcho start || test $$? -eq 130  # 130: stopped by Ctrl-C

# The tests, on SQLite and then on PostgreSQL, against the real RabbitMQ.
test: setup
	@scripts/services.sh rabbitmq postgres management chromium
	$(MAKE) --no-print-directory test-sqlite test-postgres

test-sqlite:
	DATABASE_URL=$(SQLITE_URL) $(PY) -m pytest $(PYTEST_ARGS)

test-postgres:
	DATABASE_URL=$(PG_TEST_URL) $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/consume.py
	$(PY) bench/publish.py

clean:
	rm -rf $(VENV) staticfiles db.sqlite3* test_db.sqlite3*
