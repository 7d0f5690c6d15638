# One command for the demo, one for the tests; both install what they need.
#   make demo   - venv + package + demo project on SQLite, runapscheduler with /metrics on :9100
#   make test   - system packages, database services, then every test pass below
#
# Test passes (interpreters from PATH or pyenv, see .ci/venv.sh):
#   main      Python 3.13 + Django 6.1: lint, types, PostgreSQL, MariaDB, and SQLite with
#             everything (chaos, browser, Prometheus, the built wheel in a fresh venv)
#   oldest    Python 3.10 + Django 5.2 LTS: SQLite, without the slow end-to-end tests
#   django60  Python 3.12 + Django 6.0: SQLite, without the slow end-to-end tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MAIN_PY ?= 3.13
MAIN_DJANGO ?= django>=6.1,<6.2
EXTRAS := test,postgres,mysql,otlp
PG_URL ?= postgres://postgres@127.0.0.1:5432/postgres
MYSQL_URL ?= mysql://root@127.0.0.1:3306/test
PYTEST_ARGS ?=
DEMO_VENV := .venv-demo
DJANGO52 := django>=5.2,<5.3
DJANGO60 := django>=6.0,<6.1

.PHONY: demo test venv lint test-sqlite test-postgres test-mariadb test-oldest test-django60 \
	system services bench grafana clean

# The main pass's venv. Without Python 3.13 it runs on python3 and the newest Django that
# python3 allows, except under CI=true, where that is an error.
venv:
	@bash .ci/venv.sh $(VENV) $(MAIN_PY) "$(MAIN_DJANGO)" $(EXTRAS) "django>=5.2,<6.2"

demo:
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q -e ".[demo,postgres]"
	$(DEMO_VENV)/bin/python example/manage.py migrate --no-input -v0
	@echo "Scheduler metrics: http://127.0.0.1:9100/metrics  health: /healthz  /readyz"
	$(DEMO_VENV)/bin/python example/manage.py runapscheduler --metrics-port 9100 --metrics-addr 127.0.0.1

system:
	bash .ci/system-deps.sh

services:
	bash .ci/services.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-sqlite: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test-postgres: venv
	DATABASE_URL=$(PG_URL) $(BIN)/pytest -m "not once" $(PYTEST_ARGS)

test-mariadb: venv
	DATABASE_URL=$(MYSQL_URL) $(BIN)/pytest -m "not once" $(PYTEST_ARGS)

# An extra pass on SQLite: `$(call sqlite_pass,DIR,PYTHON,DJANGO_SPEC)`; skipped with one line
# when the interpreter is missing (an error under CI=true, see .ci/venv.sh).
define sqlite_pass
	@rc=0; bash .ci/venv.sh $(1) $(2) "$(3)" test || rc=$$?; \
	if [ $$rc -eq 3 ]; then exit 0; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	echo "$(1): $$($(1)/bin/python -c 'import sys, django; print("Python", sys.version.split()[0], "+ Django", django.__version__)')"; \
	$(1)/bin/pytest -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)
endef

test-oldest:
	$(call sqlite_pass,.venv-py310-django52,3.10,$(DJANGO52))

test-django60:
	$(call sqlite_pass,.venv-py312-django60,3.12,$(DJANGO60))

test: system services venv lint test-postgres test-mariadb test-oldest test-django60 test-sqlite

bench: venv
	$(BIN)/python -m benchmarks

grafana: venv
	$(BIN)/python grafana/generate.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) .venv-py310-django52 .venv-py312-django60 .pytest_cache \
	  .mypy_cache .ruff_cache example/db.sqlite3*
