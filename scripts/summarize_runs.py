"""Aggregate finished runs into a markdown table: mean ± std over seeds, per method and eps.

    python scripts/summarize_runs.py runs/digits-*      # reads each run's summary.json
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(run_dirs):
    rows = []
    for d in run_dirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            sys.exit(f"summarize_runs: error: {path} not found (is the run finished?)")
        s = json.loads(path.read_text())
        s["eps_w_255"] = json.loads((Path(d) / "config.json").read_text())["eps_w"] * 255
        rows.append(s)
    return rows


def table(rows) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["method"], round(r["eps_w_255"], 2), r["pgd"],
                r["eps_test_255"])].append(r)
    out = ["| dataset | model | method | eps_w (/255) | seeds | natural acc | attack | PGD acc | "
           "mean eps after training (/255) | train time per run (s) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (ds, model, method, eps_w, pgd, eps_test), rs in sorted(groups.items()):
        def ms(key, fmt="{:.3f}"):
            v = np.array([r[key] for r in rs], dtype=float)
            return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1) if len(v) > 1 else 0)}"
        out.append(f"| {ds} | {model} | {method} | {eps_w:g} | "
                   f"{','.join(str(r['seed']) for r in rs)} | {ms('natural_acc')} | "
                   f"{pgd} at {eps_test:g}/255 | {ms('pgd_acc')} | {ms('eps_mean_255', '{:.1f}')} | "
                   f"{ms('train_seconds', '{:.0f}')} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/summarize_runs.py RUN_DIR [RUN_DIR ...]")
    print(table(load(sys.argv[1:])))
