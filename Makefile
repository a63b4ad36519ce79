# Mailroom — `make run` runs the whole post office, `make test` runs the tests (SQLite, then PostgreSQL);
# `make test-unit` runs the unit tier alone (no broker, no database server; seconds);
# `make cluster-test` the faults on a three-node RabbitMQ cluster alone (PostgreSQL).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/mailroom
SQLITE_URL  := sqlite:///$(CURDIR)/db.sqlite3
UNIT_DB_URL := sqlite:///$(CURDIR)/unit.sqlite3
# Nothing listens there: the unit tier proves it needs no broker.
CLOSED_RABBITMQ_URL := amqp://guest:guest@127.0.0.1:1/%2F

.PHONY: setup run test test-sqlite test-postgres test-unit cluster-test services check-python bench clean

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

# pytest with DATABASE_URL=$(1) and more environment $(2); a run that collected no tests (pytest's
# exit code 5, e.g. a PYTEST_ARGS selection that matches nothing) fails, and says so.
define pytest_run
@echo "DATABASE_URL=$(1) $(2) $(PY) -m pytest $(3) $(PYTEST_ARGS)"
@code=0; DATABASE_URL=$(1) $(2) $(PY) -m pytest $(3) $(PYTEST_ARGS) || code=$$?; \
if [ $$code -eq 5 ]; then echo "pytest collected no tests (exit code 5): nothing was tested, which is a failure." >&2; fi; \
exit $$code
endef

# The tests, on SQLite and then on PostgreSQL, against the real RabbitMQ: both suites run even when
# the first fails; the exit code is non-zero when either failed.
test: setup
	@scripts/services.sh rabbitmq postgres management chromium
	@sqlite=0; postgres=0; \
	$(MAKE) --no-print-directory test-sqlite || sqlite=$$?; \
	$(MAKE) --no-print-directory test-postgres || postgres=$$?; \
	verdict() { [ "$$1" -eq 0 ] && echo passed || echo FAILED; }; \
	echo "make test: SQLite $$(verdict $$sqlite), PostgreSQL $$(verdict $$postgres)"; \
	[ $$sqlite -eq 0 ] && [ $$postgres -eq 0 ]

test-sqlite:
	$(call pytest_run,$(SQLITE_URL))

test-postgres:
	$(call pytest_run,$(PG_TEST_URL))

# The unit tier (tests/unit/): with RabbitMQ pointed at a closed port and SQLite in-process.
test-unit: setup
	$(call pytest_run,$(UNIT_DB_URL),RABBITMQ_URL=$(CLOSED_RABBITMQ_URL),-m unit)

# The cluster tests alone (tests/cluster/, marker `cluster`): faults on a three-node RabbitMQ cluster that
# their fixture starts (scripts/cluster.sh) and removes, on PostgreSQL. `make test` runs them in its PostgreSQL pass.
cluster-test: setup
	@scripts/services.sh rabbitmq postgres
	$(call pytest_run,$(PG_TEST_URL),,-m cluster)

bench: setup
	$(PY) bench/consume.py
	$(PY) bench/publish.py

clean:
	rm -rf $(VENV) staticfiles db.sqlite3* test_db.sqlite3* unit.sqlite3* test_unit.sqlite3*
