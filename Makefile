# persona-etl: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: install demo demo-cli airflow quality-docs test eval bench bench-daily perf-docs docs clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:/'

install:  ## create .venv from requirements/lock.txt (idempotent; the same script CI and Docker use)
	./scripts/install.sh

demo: install  ## airflow dags test persona_daily on two days of the bundled AOL sample; prints personas
	$(BIN)/python -m persona_tasks.demo

demo-cli: install  ## the same steps without Airflow: whole AOL sample ingest + build, induce for 30 users
	$(BIN)/python -m persona_tasks.demo --cli

AIRFLOW_HOME ?= $(CURDIR)/.airflow
AIRFLOW_PORT ?= 8080
AIRFLOW_ENV = PATH=$(CURDIR)/$(BIN):$$PATH AIRFLOW_HOME=$(AIRFLOW_HOME) AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=$(AIRFLOW_PORT) \
	AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$(AIRFLOW_PORT)/execution/ \
	AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=persona_tasks.local_airflow.SQLITE_CONNECT_ARGS

airflow: install  ## Airflow UI at http://127.0.0.1:$(AIRFLOW_PORT) (airflow standalone; Ctrl-C stops it)
	@mkdir -p $(AIRFLOW_HOME)
	@[ -s $(AIRFLOW_HOME)/jwt_secret ] || (umask 077; $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(64))" > $(AIRFLOW_HOME)/jwt_secret)
	@$(AIRFLOW_ENV) $(BIN)/airflow db migrate >/dev/null
	@$(AIRFLOW_ENV) $(BIN)/airflow pools set warehouse_writer 1 "one DuckDB writer at a time" >/dev/null
	@echo "Airflow: http://127.0.0.1:$(AIRFLOW_PORT)  login: admin, password in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated"
	$(AIRFLOW_ENV) AIRFLOW__API_AUTH__JWT_SECRET=$$(cat $(AIRFLOW_HOME)/jwt_secret) exec $(BIN)/python -m persona_tasks.local_airflow standalone

QUALITY_DOCS_PORT ?= 8765
quality-docs: install  ## the gates' Data Docs (every check of every gate run) at http://127.0.0.1:$(QUALITY_DOCS_PORT) (Ctrl-C stops)
	$(BIN)/python -m persona_tasks.cli gate docs --port $(QUALITY_DOCS_PORT)

test: install  ## the full test suite (what CI runs)
	$(BIN)/python -m pytest -q

EVAL_LLM_USERS ?= 30
eval: install  ## persona-etl evaluate on the bundled AOL + MovieLens samples, LLM sample of $(EVAL_LLM_USERS) users; regenerates docs/results.md (CPU: ~30-60 min)
	$(BIN)/python -m persona_tasks.cli ingest --format aol data/aol/aol_sample.tsv.gz
	$(BIN)/python -m persona_tasks.cli ingest --format movielens data/movielens
	$(BIN)/python -m persona_tasks.cli build
	$(BIN)/python -m persona_tasks.cli evaluate --json bench/results/evaluate_aol_movielens.json --llm-max-users $(EVAL_LLM_USERS) --write-docs

bench: install  ## benchmarks (figures go into docs/performance.md)
	$(BIN)/python bench/bench_memories.py
	$(BIN)/python bench/bench_clustering.py

bench-daily: install  ## persona_daily under Airflow on a generated 1M-event day, static embeddings (docs/performance.md)
	$(BIN)/python bench/bench_daily.py --backend static --airflow-only

perf-docs: install  ## regenerate docs/performance.md from bench/performance.template.md and bench/results/*.json
	$(BIN)/python bench/render_performance.py

docs: install  ## dbt docs for analysts (dbt_project/target/index.html)
	$(BIN)/python -c "from persona_tasks.dbt_runner import docs_generate; from persona_tasks.config import load_settings; docs_generate(load_settings())"

clean:  ## remove generated state (venv kept)
	rm -rf warehouse landing .airflow dbt_project/target dbt_project/logs .pytest_cache
