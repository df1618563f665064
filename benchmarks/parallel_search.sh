#!/bin/bash
# Search recipe variants on one GPU with several processes at once. A run of the fast recipe
# leaves an H200 partly idle: 4 processes finished 80 runs in 500 s, where one process alone
# spent 7.4 s of wall time per run (about 68 in 500 s). Their seconds are then not comparable
# with single-process runs, only their accuracies are.
#
#   benchmarks/parallel_search.sh DATA_DIR OUT_DIR GRID1.json [GRID2.json ...]
#
# Each GRID file is a JSON list of override dicts (as for fast_recipe.py --grid); process k writes
# OUT_DIR/searchk.json and OUT_DIR/logk.txt. SEEDS (default 8), SEED_START (default 20), LIMIT
# (seconds per process, default 500) and EXTRA_TTA (e.g. multi) come from the environment.
set -u
if [ $# -lt 3 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
data=$1 out=$2
shift 2
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
# Decode once before the workers start, so they read the cache instead of racing to write it.
python -c "import sys; from cifarkit.data import load_data; load_data(sys.argv[1], progress=False)" "$data" || exit 1
k=0
for grid in "$@"; do
  k=$((k + 1))
  timeout "${LIMIT:-500}" python "$here/fast_recipe.py" --data "$data" --seeds "${SEEDS:-8}" \
    --seed-start "${SEED_START:-20}" --grid "$(cat "$grid")" ${EXTRA_TTA:+--extra-tta "$EXTRA_TTA"} --json "$out/search$k.json" \
    > "$out/log$k.txt" 2>&1 &
done
wait
grep -h "^==" "$out"/log*.txt
