# persona-etl: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: install demo test bench docs clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:/'

install:  ## create .venv from requirements/lock.txt (idempotent; the same script CI and Docker use)
	./scripts/install.sh

demo: install  ## ingest the bundled AOL sample, build intent memories, print where results are
	$(BIN)/python -m persona_tasks.demo

test: install  ## the full test suite (what CI runs)
	$(BIN)/python -m pytest -q

bench: install  ## benchmarks (figures go into docs/performance.md)
	$(BIN)/python bench/bench_memories.py
	$(BIN)/python bench/bench_clustering.py

docs: install  ## dbt docs for analysts (dbt_project/target/index.html)
	$(BIN)/python -c "from persona_tasks.dbt_runner import docs_generate; from persona_tasks.config import load_settings; docs_generate(load_settings())"

clean:  ## remove generated state (venv kept)
	rm -rf warehouse dbt_project/target dbt_project/logs .pytest_cache
