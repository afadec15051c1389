#!/usr/bin/env bash
# The README's test command N times in a row (default 3) with a CPU-bound process beside it:
# the suite must stay green when other jobs share the machine (issue 19). Not run by CI.
#   bench/suite_under_load.sh [runs]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
python3 -c "while True: pass" &
hog=$!
trap 'kill $hog 2>/dev/null' EXIT
failed=0
for run in $(seq 1 "$runs"); do
  started=$(date +%s)
  YOLO_OFFLINE=1 PYTHONFAULTHANDLER=1 .venv/bin/python -m pytest -q > "suite_under_load_$run.log" 2>&1
  status=$?
  echo "run $run: exit $status, $(( $(date +%s) - started )) s wall, $(tail -1 "suite_under_load_$run.log")"
  [ "$status" -eq 0 ] || failed=1
done
exit $failed
