#!/usr/bin/env bash
# bench/gpu_session.py on a lent GPU machine (no registry access there; Python 3.12 with torch, transformers and
# CUDA preinstalled). One transfer is capped below the 98 MB GGUF file, so the work comes in two calls to the same
# warm machine:
#   bench/gpu_session.sh stage    carry .gpu_a/: whl/ (pydantic, gguf, llguidance, trl, datasets, peft, ...),
#                                 gguf.part1, gguf.sha256; installs the wheels to /tmp/site, keeps part 1 in /tmp
#   bench/gpu_session.sh run ARGS carry .gpu_b/: gguf.part2, inputs/ (bench/gpu_session.py --inputs); joins and checks
#                                 the GGUF, runs bench/gpu_session.py ARGS, packs its output as $OUT/gpu_session.tar.gz
# (at most 8 files come back, so the output travels as one archive, written even when the run hits its time limit).
set -uo pipefail
MODE=${1:-run}; shift || true
OUTDIR=${OUT:-bench/out/gpu}
mkdir -p "$OUTDIR" /tmp/site /tmp/gguf
if [ "$MODE" = stage ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_a/whl/*.whl \
    || { echo "wheel install failed"; exit 2; }
  cp .gpu_a/gguf.part1 .gpu_a/gguf.sha256 /tmp/gguf/ && echo "staged: $(ls /tmp/site | wc -l) entries in /tmp/site"
  PYTHONPATH=/tmp/site python3 - <<'EOF'
import importlib
for m in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "pyarrow", "fsspec", "llguidance",
          "pydantic", "gguf", "tokenizers"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "FAILED", type(e).__name__, e)
EOF
  exit 0
fi
[ -f /tmp/gguf/gguf.part1 ] || { echo "no staged part 1: run 'stage' first on this warm machine"; exit 3; }
GG=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/gguf/gguf.part1 .gpu_b/gguf.part2 > "$GG"
[ "$(sha256sum "$GG" | cut -d' ' -f1)" = "$(cut -d' ' -f1 /tmp/gguf/gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 4; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PERSONA_ETL_MODELS_DIR=/tmp/models PERSONA_ETL_WAREHOUSE=/tmp/wh.duckdb PERSONA_ETL_THREADS=8
export PERSONA_ETL_LABELLING__MODEL_PATH="$GG"
mkdir -p /tmp/gs_out
# transformers 5.17 (the GPU image's) converts this GGUF's tokenizer wrongly (eos <|im_start|>, a byte-fallback
# decoder that llguidance's tokenizer view cannot use: every grammar-arm answer came out empty); the lock's
# transformers converts it right. .gpu_b/tok/ carries the tokenizer files converted here; they replace the GPU's.
if [ -d .gpu_b/tok ]; then
  # convert_gguf refuses that conversion (check_converted_tokenizer); here the weights are kept and the tokenizer
  # files are replaced right after, so the check is skipped for this one conversion
  CONV=$(python3 -c "import persona_tasks.labelling.model as M; from persona_tasks.config import load_settings; M.check_converted_tokenizer = lambda *a: None; print(M.resolve_model(load_settings())[0])" 2>/dev/null | tail -1)
  [ -d "$CONV" ] || { echo "GGUF conversion failed"; exit 5; }
  for f in .gpu_b/tok/*; do case "$f" in *.gz) gunzip -c "$f" > "$CONV/$(basename "${f%.gz}")";; *) cp "$f" "$CONV/";; esac; done
  echo "tokenizer files replaced in $CONV"
fi
for f in .gpu_b/inputs/*.gz .gpu_b/inputs/*/*.gz; do [ -f "$f" ] && gunzip -f "$f"; done
timeout "${GPU_SESSION_TIMEOUT:-500}" python3 bench/gpu_session.py --inputs .gpu_b/inputs --out /tmp/gs_out "$@" 2>&1 \
  | grep -vE "Loading weights|it/s\]|examples/s\]|FutureWarning|warnings.warn"
echo "gpu_session exit ${PIPESTATUS[0]}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
tar czf "$OUTDIR/gpu_session.tar.gz" -C /tmp/gs_out . && ls -la "$OUTDIR"
