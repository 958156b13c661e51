# KLM — the two commands: `make up` (run the system) and `make test` (run the whole suite).
# Both install what is missing, so they work on a bare Debian machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV_VERSION := 0.13.9
VENV := .venv
PY := $(VENV)/bin/python
STACK := infra/stack.sh
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: help install up down status demo test test-unit test-integration lint bench chaos clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

install: ## install what is missing: Debian packages, Kafka jars, uv, the Python workspace
	@$(STACK) install
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --user "uv==$(UV_VERSION)"
	@uv sync --all-packages --frozen --quiet
	@echo "python: workspace installed in $(VENV)"

up: install ## start Kafka, PostgreSQL, SoftHSM and the four services; show they are ready
	@$(STACK) up
	@eval "$$($(STACK) env)" && $(VENV)/bin/klm db migrate && $(VENV)/bin/klm topics ensure \
	  && $(VENV)/bin/klm-audit tokens ensure-dev
	@infra/services.sh start
	@echo "KLM is up. Try: make demo   (stop with: make down)"

down: ## stop the services and the stack (data stays in .klm/)
	@infra/services.sh stop || true
	@$(STACK) down

status: ## what is running
	@$(STACK) status || true
	@infra/services.sh status

demo: ## publish a few key requests and show the events and the audit history
	@eval "$$($(STACK) env)" && $(VENV)/bin/klm demo

test: install ## run every unit and integration test against the real stack
	@$(STACK) up kafka postgres hsm
	@eval "$$($(STACK) env)" && $(VENV)/bin/klm db migrate >/dev/null
	@eval "$$($(STACK) env)" && bash infra/run-pytest.sh

test-unit: install ## unit tests only (no Kafka, Postgres or HSM needed)
	@$(VENV)/bin/pytest -q -m "not integration"

lint: install ## ruff and mypy
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy

bench: up ## benchmarks against the real local stack; writes docs/benchmarks.md
	@eval "$$($(STACK) env)" && for b in bench/*.py; do \
	  [ "$$b" = bench/benchlib.py ] && continue; \
	  echo "== $$b"; $(PY) $$b || exit 1; done

chaos: install ## long fault run (5,000 requests, kill -9 / Kafka / Postgres / HSM faults on an own instance), security and fuzz tests; figures for docs/reliability.md
	@$(STACK) up kafka postgres hsm
	@eval "$$($(STACK) env)" && KLM_CHAOS_REQUESTS=$${KLM_CHAOS_REQUESTS:-5000} \
	  KLM_CHAOS_RATE=$${KLM_CHAOS_RATE:-25} bash infra/run-pytest.sh -p no:cacheprovider -s \
	  tests/integration/test_chaos.py tests/integration/test_security_kafka.py \
	  tests/integration/test_fuzz_keygen.py libs/klm-common/tests/test_fuzz_consumers.py

clean: down ## stop everything and delete the local data (.klm/)
	@$(STACK) reset
