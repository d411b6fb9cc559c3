#!/usr/bin/env bash
# One device call's worth of measuring: a seconds-long smoke sweep first (so a broken
# measuring path fails fast instead of eating the call), then each MATRIX into
# $OUT/NAME.jsonl in turn, resumed from profiles/measurements/NAME.jsonl when an earlier call
# left it unfinished. All sweeps share one deadline, SECONDS from the start.
#
#   scripts/measure-on-device.sh 500 profiles/matrices/dense-h100.yaml h100-dense [MATRIX NAME ...]
set -euo pipefail
seconds=$1; shift
deadline=$(( $(date +%s) + seconds ))
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:?run this on the device machine, where OUT is set}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$here/device-run.sh" python3 -m vramplan.validate.sweep profiles/matrices/smoke.yaml /tmp/smoke.jsonl
python3 - /tmp/smoke.jsonl <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
bad = [r for r in rows if r.get("status") != "ok"]
assert rows and not bad, f"smoke sweep failed: {bad}"
print("smoke ok:", [r["peak_allocated_bytes"] for r in rows])
PY
while [ $# -ge 2 ]; do
  matrix=$1 name=$2; shift 2
  [ -f "profiles/measurements/$name.jsonl" ] && cp "profiles/measurements/$name.jsonl" "$out/$name.jsonl"
  left=$(( deadline - $(date +%s) ))
  [ "$left" -gt 10 ] || { echo "no time left for $matrix"; continue; }
  "$here/device-run.sh" python3 -m vramplan.validate.sweep "$matrix" "$out/$name.jsonl" "$left"
  python3 - "$out/$name.jsonl" <<'PY'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(sys.argv[1].rsplit("/", 1)[-1], "rows:", len(rows), dict(collections.Counter(r.get("status") for r in rows)))
PY
done
