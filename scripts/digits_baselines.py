"""The digits table of the baselines (README): clean, PGD-AT, TRADES, IAAT and IAAT with the
TRADES loss, each with its trained weights and its weight average, over seeds.

    python scripts/digits_baselines.py                  # the README's table (about an hour, 2 cores)
    python scripts/digits_baselines.py --seeds 0 --jobs 1 --out /tmp/table.md

Trains every method with the digits preset and `--ema 0.999` into runs/baselines/<method>-seed<s>
(a run keeps its trained weights and the average side by side, and its trained weights are the
same, bit for bit, as a run without --ema), then evaluates both with
`iaat.py eval RUN --parts whitebox,autoattack --whitebox 1000x2 --weights raw|ema` on the whole
test set: PGD-1000 with 2 restarts and standard AutoAttack, stage by stage, and each image's
worst case over the two. Runs `--jobs` processes side by side, each on its share of the cores
(--threads), and skips what is done: a finished run with these settings, an evaluation whose
JSON is complete. Prints the markdown table: mean ± std over the seeds, and the training time of
each method relative to PGD-AT's (from the runs' summary.json, measured beside the other jobs).
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import iaat_notebook  # noqa: E402
from iaat_report import table_cells  # noqa: E402

METHODS = {  # folder name: (label, flags of iaat.py)
    "clean": ("clean training", ["--method", "clean"]),
    "at": ("PGD-AT", ["--method", "at"]),
    "trades": ("TRADES", ["--method", "trades"]),
    "iaat": ("IAAT", ["--method", "iaat"]),
    "iaat-trades": ("IAAT, TRADES loss", ["--method", "iaat", "--loss", "trades"]),
}
EVAL = ["--parts", "whitebox,autoattack", "--whitebox", "1000x2"]
COLUMNS = ("natural", "PGD-1000x2", "AA after APGD-CE", "AA after APGD-T", "AA after FAB-T",
           "AutoAttack", "worst case")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    p.add_argument("--ema", default="0.999", help="decay of the weight average (--ema)")
    p.add_argument("--jobs", type=int, default=2, help="processes side by side")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: the "
                   "cores / --jobs, at least 1)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "baselines")
    p.add_argument("--train-flags", default="", help="more flags for every run (quick tries: "
                   "'--epochs 2 --n-train 256')")
    p.add_argument("--eval-flags", default="", help="more flags for every evaluation "
                   "(quick tries: '--n-examples 50')")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    return p.parse_args(argv)


def run_all(commands: list, jobs: int, threads: int) -> None:
    """Each command in its own process, `jobs` at a time; SystemExit if one fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")

    def one(cmd):
        r = subprocess.run([sys.executable, "iaat.py", *cmd, "--threads", str(threads)], cwd=ROOT,
                           env=env, capture_output=True, text=True)
        print(f"{'ok' if r.returncode == 0 else 'FAILED'}: python iaat.py {' '.join(cmd)}",
              flush=True)
        return r
    with ThreadPoolExecutor(jobs) as pool:
        failed = [r for r in pool.map(one, commands) if r.returncode != 0]
    if failed:
        sys.exit(f"digits_baselines: error: {len(failed)} commands failed; the first said:\n"
                 f"{failed[0].stderr[-2000:]}")


def complete(path: Path) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("complete", False)


def table(args) -> str:
    """Markdown: a row per method and weights, mean ± std over the seeds, and training time."""
    def mean_std(v):
        v = np.asarray(v, dtype=float)
        return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    def seconds(m):
        return [json.loads((args.runs / f"{m}-seed{s}" / "summary.json").read_text())
                ["train_seconds"] for s in args.seeds]
    base = np.mean(seconds("at")) if "at" in args.methods else None
    lines = ["| method | weights | " + " | ".join(COLUMNS) + " | training (s) | time / PGD-AT |",
             "|" + " --- |" * (len(COLUMNS) + 4)]
    for m in args.methods:
        t = seconds(m)
        for weights, stem in (("trained", "eval"), ("average", "eval_ema")):
            cells = [table_cells(json.loads((args.runs / f"{m}-seed{s}" / f"{stem}.json")
                                            .read_text())) for s in args.seeds]
            lines.append(f"| {METHODS[m][0]} | {weights} | " + " | ".join(
                mean_std([c[k] for c in cells]) for k in COLUMNS) + f" | {mean_std(t)} | " +
                (f"{np.mean(t) / base:.2f}" if base else "-") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runs = {(m, s): args.runs / f"{m}-seed{s}" for m in args.methods for s in args.seeds}
    train = [[*METHODS[m][1], "--seed", str(s), "--ema", args.ema, "--out", str(out),
              *args.train_flags.split()] for (m, s), out in runs.items()]
    run_all([argv for argv in train if not iaat_notebook.finished(argv)], args.jobs, threads)
    run_all([["eval", str(out), *EVAL, "--weights", w, *args.eval_flags.split()]
             for out in runs.values() for w, stem in (("raw", "eval"), ("ema", "eval_ema"))
             if not complete(out / f"{stem}.json")], args.jobs, threads)
    text = (f"Digits, seeds {', '.join(map(str, args.seeds))}: accuracy in %, mean ± std over "
            f"the seeds; weights: the trained ones or their average (--ema {args.ema}).\n\n"
            + table(args) + "\n")
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
