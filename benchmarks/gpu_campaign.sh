#!/usr/bin/env bash
# The one command to run on a lent GPU machine (torch, transformers, peft and nvidia-ml-py
# present; nothing installed; the repo need not be pip-installed). Writes under $OUT
# (default ./out):
#   cuda-standard.jsonl  the gpu-standard matrix on the cuda backend (this shard's cases)
#   gpu-tests.log        the test suite's gpu-marked tests (skipped with SKIP_TESTS=1)
#   provenance.txt       nvidia-smi, versions, commit
# The 70 cases take ~12-18 minutes in all (a subprocess per case), so split them over
# device calls of <= 10 minutes: SHARD=0/3, then SKIP_TESTS=1 SHARD=1/3, then 2/3.
# Each call starts with an empty $OUT: to resume a shard, carry its returned jsonl into
# the tree and pass RESUME=path (finished cases are skipped). Records merge by concatenation.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${RESUME:-}" ] && [ -f "$RESUME" ]; then cp "$RESUME" "$OUT/cuda-standard.jsonl"; fi
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit: $(git rev-parse HEAD 2>/dev/null || cat COMMIT 2>/dev/null || echo unknown)"
  echo "shard: ${SHARD:-0/1}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch, transformers, peft, platform; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
} > "$OUT/provenance.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 120 "$PY" -m pytest -q -m gpu tests > "$OUT/gpu-tests.log" 2>&1 || true
  tail -n 3 "$OUT/gpu-tests.log"
fi
timeout "${CALL_BUDGET_S:-540}" "$PY" -m profiler.cli sweep benchmarks/gpu-standard.toml --backend cuda \
  --out "$OUT/cuda-standard.jsonl" --shard "${SHARD:-0/1}" --case-timeout "${CASE_TIMEOUT:-120}"
echo "records: $(wc -l < "$OUT/cuda-standard.jsonl" 2>/dev/null || echo 0) in $OUT/cuda-standard.jsonl"
