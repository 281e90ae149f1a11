#!/usr/bin/env bash
# What one lent-GPU call runs (issue 10): the campaign (gpu_campaign.sh) into $OUT, then,
# while time is left, gpu-repeat.toml's 5 cases again (run-to-run spread), then the worker
# logs packed into one file, so that what comes back stays within the device tool's
# 8 files. SESSION_S (default 470): the seconds this script may take in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
LIMIT="${SESSION_S:-470}"
mkdir -p "$OUT"
OUT="$OUT" bash benchmarks/gpu_campaign.sh
rc=$?
left=$((LIMIT - SECONDS))
if [ "$left" -gt 100 ]; then
  echo "== repeat: gpu-repeat.toml, ${left}s left"
  CALL_BUDGET_S=$((left - 70)) SKIP_TESTS=1 MATRIX=benchmarks/gpu-repeat.toml OUT="$OUT/repeat" \
    bash benchmarks/gpu_campaign.sh
  mv "$OUT/repeat/"*-standard.jsonl "$OUT/repeat.jsonl" 2>/dev/null
else
  echo "== repeat skipped: ${left}s left"
fi
( cd "$OUT" && tar czf logs.tar.gz worker-*.log repeat 2>/dev/null; rm -rf worker-*.log repeat )
ls -l "$OUT"
exit "$rc"
