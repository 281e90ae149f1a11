#!/usr/bin/env bash
# What one lent-GPU call runs (issues 10, 27): first gpu-families.toml (the families added
# since the last campaign, 3 steps each: FAMILIES_S, default 200 s), then the campaign
# (gpu_campaign.sh, gpu-standard.toml with the gpu-marked tests) into $OUT while time is left,
# then gpu-repeat.toml's 5 cases again (run-to-run spread), then the worker logs packed into
# one file, so that what comes back stays within the device tool's 8 files. SESSION_S
# (default 470): the seconds this script may take in all. A case not started in budget is
# started by the same command given RESUME (see gpu_campaign.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
LIMIT="${SESSION_S:-470}"
mkdir -p "$OUT"
echo "== families: gpu-families.toml"
CALL_BUDGET_S="${FAMILIES_S:-200}" SKIP_TESTS=1 MATRIX=benchmarks/gpu-families.toml OUT="$OUT/families" \
  bash benchmarks/gpu_campaign.sh
frc=$?
mv "$OUT/families/"*-families.jsonl "$OUT/" 2>/dev/null
mv "$OUT/families/provenance.txt" "$OUT/families-provenance.txt" 2>/dev/null
for f in "$OUT/families/"worker-*.log; do [ -e "$f" ] && mv "$f" "$OUT/families-$(basename "$f")"; done
left=$((LIMIT - SECONDS - 70))
if [ "$left" -gt 30 ]; then
  CALL_BUDGET_S=$(( left < 330 ? left : 330 )) OUT="$OUT" bash benchmarks/gpu_campaign.sh
  rc=$?
else
  echo "== gpu-standard skipped: ${left}s left"; rc=1
fi
[ "$frc" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$frc
left=$((LIMIT - SECONDS))
if [ "$left" -gt 100 ]; then
  echo "== repeat: gpu-repeat.toml, ${left}s left"
  CALL_BUDGET_S=$((left - 70)) SKIP_TESTS=1 MATRIX=benchmarks/gpu-repeat.toml OUT="$OUT/repeat" \
    bash benchmarks/gpu_campaign.sh
  mv "$OUT/repeat/"*-repeat.jsonl "$OUT/repeat.jsonl" 2>/dev/null
else
  echo "== repeat skipped: ${left}s left"
fi
( cd "$OUT" && tar czf logs.tar.gz worker-*.log families-worker-*.log repeat families 2>/dev/null
  rm -rf worker-*.log families-worker-*.log repeat families )
ls -l "$OUT"
exit "$rc"
