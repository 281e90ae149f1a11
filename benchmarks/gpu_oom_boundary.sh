#!/usr/bin/env bash
# The out-of-memory boundary on a lent GPU (issue 23): for 14 setups of the campaign's
# models, the caching allocator capped with torch.cuda.set_per_process_memory_fraction to a
# 16, 24, 40 and 80 GB card, the largest batch that runs three steps, beside fit's largest
# safe batch (benchmarks/oom_boundary.py). Needs python3 with torch, transformers and peft;
# nothing installed or downloaded. Writes under $OUT (default ./out):
#   oom-boundary.jsonl   one line per (setup, card), appended with fsync as each ends
#   provenance.txt       nvidia-smi, versions, commit, then the script's table
# Knobs: BACKEND=cuda|sim (sim rehearses on CPU: SETUPS=tiny CARDS=2GB), CALL_BUDGET_S
# (default 480: no setup starts after it), CARDS (default 16GB,24GB,40GB,80GB), SETUPS
# (all|tiny), LIMIT (only the first N setups).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
BACKEND="${BACKEND:-cuda}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
COMMIT="$(cat COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit: $COMMIT  backend: $BACKEND  budget: ${CALL_BUDGET_S:-480}s"
  if [ "$BACKEND" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; fi
  "$PY" -c 'import torch, transformers, platform; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
} > "$OUT/provenance.txt" 2>&1
timeout --kill-after=10 $(( ${CALL_BUDGET_S:-480} + 120 )) "$PY" benchmarks/oom_boundary.py --backend "$BACKEND" \
  --out "$OUT/oom-boundary.jsonl" --budget-s "${CALL_BUDGET_S:-480}" --cards "${CARDS:-16GB,24GB,40GB,80GB}" \
  --setups "${SETUPS:-all}" ${LIMIT:+--limit "$LIMIT"} 2>&1 | tee -a "$OUT/provenance.txt"
exit "${PIPESTATUS[0]}"
