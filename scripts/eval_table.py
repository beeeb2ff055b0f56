"""One markdown table from several `iaat.py eval` results: mean ± std over seeds per method,
and with --plot a figure of their eps and steps sweeps (paper Figs 4 and 9).

    python scripts/eval_table.py runs/digits-*/eval.json [--plot docs/digits_eval_sweeps.png]
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iaat_report import table_cells  # noqa: E402


def by_setting(results: list) -> dict:
    """Results grouped by dataset, model, method (and checkpoint: best or last), test eps and
    number of examples."""
    groups = defaultdict(list)
    for r in results:
        method = r["method"] + (" (best)" if r.get("checkpoint") == "best" else "")
        groups[(r["dataset"], r["model"], method, r["eps_255"], r["n_examples"])].append(r)
    return groups


def table(results: list) -> str:
    groups = by_setting(results)
    titles = list(dict.fromkeys(t for r in results for t in table_cells(r)))
    out = ["| method | seeds | " + " | ".join(titles) + " |", "|" + " --- |" * (len(titles) + 2)]
    for (ds, model, method, eps, n), rs in groups.items():
        cells = []
        for t in titles:
            v = np.array([table_cells(r)[t] for r in rs if t in table_cells(r)])
            cells.append("-" if not len(v) else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"
                         if len(v) > 1 else f"{v[0]:.1f}")
        out.append(f"| {ds} {model} {method} | {','.join(str(r['seed']) for r in rs)} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(results: list, path: Path) -> None:
    """Mean (line) and min-max over seeds (band) of each method's sweeps."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, xkey, xlabel, title in (
            (axes[0], "eps_sweep", "eps_255", "test eps (x/255)", "accuracy over test eps (Fig 4)"),
            (axes[1], "steps_sweep", "steps", "PGD steps", "accuracy over PGD steps (Fig 9)")):
        for (ds, model, method, eps, n), rs in by_setting([r for r in results if key in r]).items():
            x = rs[0][key][xkey]
            if any(r[key][xkey] != x for r in rs):
                sys.exit(f"eval_table: error: the {key} points differ between the {method} runs")
            acc = 100 * np.array([r[key]["acc"] for r in rs])
            ax.plot(x, acc.mean(0), marker=".", label=f"{ds} {model} {method} ({len(rs)} seeds)")
            ax.fill_between(x, acc.min(0), acc.max(0), alpha=0.25)
        ax.set(xlabel=xlabel, ylabel="accuracy (%)", title=title, ylim=(0, 100))
        ax.set_xscale("log" if key == "steps_sweep" else "linear")
        ax.legend()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="eval.json files")
    parser.add_argument("--plot", type=Path, help="also draw the sweeps into this .png")
    args = parser.parse_args()
    missing = [p for p in args.results if not p.is_file()]
    if missing:
        sys.exit(f"eval_table: error: {missing[0]} not found (run `python iaat.py eval` first)")
    results = [json.loads(p.read_text()) for p in args.results]
    print(table(results))
    if args.plot is not None:
        plot(results, args.plot)
