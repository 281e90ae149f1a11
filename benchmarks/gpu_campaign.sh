#!/usr/bin/env bash
# The one command to run on a lent GPU machine (torch, transformers, peft, nvidia-ml-py
# present; nothing installed). Writes records under $OUT (default ./out):
#   cuda-standard.jsonl  the gpu-standard matrix on the cuda backend
#   gpu-tests.log        the test suite's gpu-marked tests
#   provenance.txt       nvidia-smi, versions, git commit
# Resumable: rerun with the same $OUT and finished cases are skipped. Split over two
# device calls with SHARD=0/2 and SHARD=1/2 (records merge by concatenation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (not a git checkout)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c 'import torch, transformers, peft, platform; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
} > "$OUT/provenance.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
  python -m pytest -q -m gpu tests > "$OUT/gpu-tests.log" 2>&1 || true
  tail -n 3 "$OUT/gpu-tests.log"
fi
python -m profiler.cli sweep benchmarks/gpu-standard.toml --backend cuda \
  --out "$OUT/cuda-standard.jsonl" --shard "${SHARD:-0/1}" --case-timeout "${CASE_TIMEOUT:-120}"
