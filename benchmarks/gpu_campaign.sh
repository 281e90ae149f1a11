#!/usr/bin/env bash
# The one command for a lent GPU machine: the whole gpu-standard matrix (70 cases, 7
# architectures) plus the gpu-marked tests, in one call of <= 6 minutes on one H100.
# Needs python3 with torch, transformers, peft and nvidia-ml-py; nothing is installed or
# downloaded and the repo need not be pip-installed (PYTHONPATH). Writes under $OUT
# (default ./out), each file as soon as it has something:
#   cuda-standard.jsonl  one record per case, appended with flush + fsync as each case ends
#                        (named after the matrix: gpu-families.toml -> cuda-families.jsonl)
#   campaign.json        device, driver, CUDA, versions, commit, worker contexts, seconds per case
#   provenance.txt       nvidia-smi, versions, commit, then the seconds-per-case table
#   gpu-tests.log        the gpu-marked tests, run beside the cases
#   worker-N.log         each worker's stderr
# Knobs: CAMPAIGN_BACKEND=cuda|sim|cpu (sim/cpu rehearse the same scheduler without a GPU;
# records then say sim/cpu), CALL_BUDGET_S (default 330: no case starts after it),
# WORKERS, CASE_TIMEOUT (120 s), RESUME=path (a returned jsonl: its cases are skipped),
# SKIP_TESTS=1, MATRIX (default benchmarks/gpu-standard.toml).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
BACKEND="${CAMPAIGN_BACKEND:-cuda}"
MATRIX="${MATRIX:-benchmarks/gpu-standard.toml}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${CALL_BUDGET_S:-330}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
NAME="$(basename "$MATRIX" .toml)"
RECORDS="$OUT/${BACKEND}-${NAME#gpu-}.jsonl"  # gpu-standard.toml -> cuda-standard.jsonl, gpu-families.toml -> cuda-families.jsonl
if [ -n "${RESUME:-}" ] && [ -f "$RESUME" ] && [ "$(realpath "$RESUME")" != "$(realpath -m "$RECORDS")" ]; then
  cp "$RESUME" "$RECORDS"
fi
# COMMIT (a file) wins: a device copy of the tree may carry a stale .git
COMMIT="$(cat COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit: $COMMIT"
  echo "backend: $BACKEND  matrix: $MATRIX  budget: ${BUDGET}s"
  if [ "$BACKEND" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; fi
  "$PY" -c 'import torch, transformers, peft, platform; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
} > "$OUT/provenance.txt" 2>&1
TESTS=--tests
if [ -n "${SKIP_TESTS:-}" ]; then TESTS=; fi
# timeout is a backstop only: the campaign stops starting cases at the budget by itself.
timeout --kill-after=10 $((BUDGET + 60)) "$PY" -m profiler.cli campaign "$MATRIX" --backend "$BACKEND" \
  --out "$OUT" --records "$RECORDS" --budget-s "$BUDGET" --case-timeout "${CASE_TIMEOUT:-120}" \
  ${WORKERS:+--workers "$WORKERS"} --commit "$COMMIT" $TESTS | tee -a "$OUT/provenance.txt"
rc=${PIPESTATUS[0]}
echo "records: $(wc -l < "$RECORDS" 2>/dev/null || echo 0) in $RECORDS (exit $rc)"
tail -n 3 "$OUT/gpu-tests.log" 2>/dev/null
exit "$rc"
