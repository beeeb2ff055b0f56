#!/usr/bin/env bash
# The README's digits table: IAAT and PGD-AT at the preset eps_w (51/255 = 0.2), seeds 0-2,
# run one after another; prints each run's wall time, then the table of mean ± std.
#   bash scripts/digits_seeds.sh [extra iaat.py flags]     (PREFIX=runs/x sets the run folders)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${PREFIX:-runs/digits}
dirs=()
for seed in 0 1 2; do
  for method in iaat at; do
    out="$prefix-$method-seed$seed"
    start=$(date +%s.%N)
    python iaat.py --method "$method" --seed "$seed" --out "$out" "$@" | tail -n 1
    echo "wall time $(python -c "print(f'{$(date +%s.%N) - $start:.0f}')") s: $method seed $seed"
    dirs+=("$out")
  done
done
python scripts/summarize_runs.py "${dirs[@]}"
