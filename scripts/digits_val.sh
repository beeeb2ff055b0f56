#!/usr/bin/env bash
# The --val-size table of docs/evaluation.md: IAAT and PGD-AT, seeds 0-2, each trained with VAL (200) of its
# training images held out. Each run's best checkpoint (by PGD accuracy on the held-out images)
# and its last are evaluated on the whole test set with PGD-1000x2 and standard AutoAttack.
# Rerunning skips the finished runs and evaluations.
#   bash scripts/digits_val.sh [extra `iaat.py eval` flags]    (PREFIX=runs/x, VAL=N)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${PREFIX:-runs/digits-val}
files=()
seconds() { python -c "import time; print(f'{time.time() - $1:.0f}')"; }
for seed in 0 1 2; do
  for method in iaat at; do
    out="$prefix-$method-seed$seed"
    start=$(date +%s.%N)
    python iaat.py --method "$method" --seed "$seed" --val-size "${VAL:-200}" --out "$out" | tail -n 1
    echo "wall time $(seconds "$start") s: $method seed $seed"
    for which in best last; do
      file="$out/eval_$which.json"
      if ! python -c "import json, sys; sys.exit(not json.load(open('$file')).get('complete'))" 2>/dev/null; then
        start=$(date +%s.%N)
        python iaat.py eval "$out" --checkpoint "$which" --parts whitebox,autoattack \
          --whitebox 1000x2 --name "eval_$which" "$@" > /dev/null
        echo "wall time $(seconds "$start") s: eval $out --checkpoint $which"
      fi
      files+=("$file")
    done
  done
done
python scripts/eval_table.py "${files[@]}"
