#!/usr/bin/env bash
# LLM labelling benchmark on a lent GPU machine (no registry access there, Python 3.12 with torch and
# transformers preinstalled). Everything it needs beyond that travels in two folders, because one transfer is
# capped below the 98 MB GGUF file:
#   .gpu_a/  wheels (pydantic, pydantic-settings, gguf, ...), label_inputs.json (bench_labelling.py
#            --write-inputs), cfg/ (SmolLM2 config + tokenizer, for --random-init), gguf.part1, gguf.sha256
#   .gpu_b/  gguf.part2 (sent by a second call to the same warm machine)
# With both parts present the real SmolLM2-135M-Instruct runs; otherwise the same architecture with random
# weights (throughput only). Results go to $OUT (or bench/out/gpu).
#   usage: bench/gpu_labelling.sh quick|full
set -uo pipefail
MODE=${1:-full}
OUTDIR=${OUT:-bench/out/gpu}
mkdir -p "$OUTDIR" /tmp/site /tmp/gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_a/*.whl \
  || { echo "wheel install failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export PERSONA_ETL_MODELS_DIR=/tmp/models PERSONA_ETL_WAREHOUSE=/tmp/wh.duckdb PERSONA_ETL_THREADS=8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
EXTRA=()
GG=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f .gpu_a/gguf.part1 ] && [ -f .gpu_b/gguf.part2 ]; then
  cat .gpu_a/gguf.part1 .gpu_b/gguf.part2 > "$GG"
  if [ "$(sha256sum "$GG" | cut -d' ' -f1)" = "$(cut -d' ' -f1 .gpu_a/gguf.sha256)" ]; then
    export PERSONA_ETL_LABELLING__MODEL_PATH="$GG"; echo "model: real SmolLM2-135M-Instruct (GGUF checksum ok)"
  else
    echo "GGUF checksum mismatch: random init"; rm -f "$GG"
  fi
fi
if [ -z "${PERSONA_ETL_LABELLING__MODEL_PATH:-}" ]; then
  export PERSONA_ETL_LABELLING__MODEL_PATH=$PWD/.gpu_a/cfg; EXTRA=(--random-init); echo "model: random init"
fi
B="python3 bench/bench_labelling.py --inputs .gpu_a/label_inputs.json --device cuda ${EXTRA[*]}"
if [ "$MODE" = quick ]; then
  $B --max-clusters 64 --batch-sizes 16,64 --dtypes bf16 --out "$OUTDIR/quick" 2>&1 | tail -n 40
else
  # batch 1 and the CPU baseline (8 threads, same machine, same run) on a subset; then all 220 clusters
  $B --max-clusters 32 --batch-sizes 1,8 --dtypes bf16 --cpu-baseline 16 --out "$OUTDIR/small" 2>&1 | grep -vE "Loading weights|it/s\]" | tail -n 40
  $B --batch-sizes 32,64,128 --dtypes bf16,fp32 --out "$OUTDIR/full" 2>&1 | grep -vE "Loading weights|it/s\]" | tail -n 60
fi
ls -R "$OUTDIR"
