# One command for the demo, one for the tests; both install what they need.
#   make demo   - venv + package + demo project on SQLite, runapscheduler with /metrics on :9100
#   make test   - venv + system packages + database services, then lint, types and the
#                 test suite on SQLite, PostgreSQL and MariaDB
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PG_URL ?= postgres://postgres@127.0.0.1:5432/postgres
MYSQL_URL ?= mysql://root@127.0.0.1:3306/test
PYTEST_ARGS ?=

VENV42 := .venv-django42
STAMP42 := $(VENV42)/.installed

.PHONY: demo test lint test-sqlite test-postgres test-mariadb test-django42 system services bench grafana clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,postgres,mysql,otlp]"
	touch $(STAMP)

demo:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[demo,postgres]"
	$(BIN)/python example/manage.py migrate --no-input -v0
	@echo "Scheduler metrics: http://127.0.0.1:9100/metrics  health: /healthz  /readyz"
	$(BIN)/python example/manage.py runapscheduler --metrics-port 9100 --metrics-addr 127.0.0.1

system:
	bash .ci/system-deps.sh

services:
	bash .ci/services.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-sqlite: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test-postgres: $(STAMP)
	DATABASE_URL=$(PG_URL) $(BIN)/pytest -m "not once" $(PYTEST_ARGS)

test-mariadb: $(STAMP)
	DATABASE_URL=$(MYSQL_URL) $(BIN)/pytest -m "not once" $(PYTEST_ARGS)

# The oldest supported Django (4.2 LTS) on SQLite, end-to-end tests left out for time.
$(STAMP42): pyproject.toml
	$(PYTHON) -m venv $(VENV42)
	$(VENV42)/bin/pip install -q --upgrade pip
	$(VENV42)/bin/pip install -q "django>=4.2,<5" -e ".[test]"
	touch $(STAMP42)

test-django42: $(STAMP42)
	$(VENV42)/bin/pytest -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

test: system $(STAMP) services lint test-postgres test-mariadb test-django42 test-sqlite

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(VENV42) .pytest_cache .mypy_cache .ruff_cache example/db.sqlite3*
