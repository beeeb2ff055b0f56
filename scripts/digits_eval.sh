#!/usr/bin/env bash
# The digits evaluation table of docs/evaluation.md: the full protocol (`iaat.py eval`, digits preset) on the
# runs of scripts/digits_seeds.sh. The transfer attack on seed s is crafted on seed s+1 (mod 3),
# an independently trained copy, as in the paper. Then one table of mean ± std over seeds.
#   bash scripts/digits_eval.sh [extra `iaat.py eval` flags]   (PREFIX and SEEDS as for the runs)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${PREFIX:-runs/digits}
seeds=(${SEEDS:-0 1 2})
if (( ${#seeds[@]} < 2 )); then
  echo "digits_eval.sh: error: the transfer attack needs a second seed as surrogate (SEEDS=\"0 1\")" >&2
  exit 2
fi
files=()
for method in iaat at; do
  for i in "${!seeds[@]}"; do
    run="$prefix-$method-seed${seeds[$i]}"
    surrogate="$prefix-$method-seed${seeds[$(( (i + 1) % ${#seeds[@]} ))]}"
    start=$(date +%s.%N)
    python iaat.py eval "$run" --surrogate "$surrogate" "$@" > /dev/null
    echo "wall time $(python -c "print(f'{$(date +%s.%N) - $start:.0f}')") s: eval $run"
    files+=("$run/eval.json")
  done
done
python scripts/eval_table.py "${files[@]}" --plot "${PLOT:-docs/digits_eval_sweeps.png}"
