"""What an IAAT radius is worth: upper bounds on the minimal adversarial radius, rankings by radius,
label noise.

    python iaat.py rank runs/digits-smallcnn-iaat-seed0          # or: iaat rank RUN
    python iaat.py rank RUN --out ranking.csv

writes the run's training images sorted by their final radius eps_i (smallest first) as a CSV
with the columns index, label, radius_255. From Python, with radii in [0,1]:

    import iaat_radius
    ranking = iaat_radius.rank_by_radius("runs/digits-smallcnn-iaat-seed0")
    r = iaat_radius.minimal_radius(model, x, y, eps_max=0.5)    # bisection over PGD

With `iaat.py --label-noise` (iaat.flip_labels, also here as iaat_radius.flip_labels), a small
radius flags suspicious labels (notebook 03). This module imports iaat and iaat_eval; iaat.py
imports it only inside main, for `iaat rank`.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from iaat import PIXEL, flip_labels, load_data, model_mode  # noqa: F401 (flip_labels: its API)
from iaat_eval import attack_correct, run_config
from iaat_run import CLIParser, IAATError, atomic_write


def minimal_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_max: float = 0.5,
                   tol: float = 1 / PIXEL, steps: int = 20, restarts: int = 3,
                   step_rel: float = 0.25, batch_size: int = 500) -> torch.Tensor:
    """An upper bound on each image's minimal adversarial L-inf radius, (B,), in [0,1]: the
    smallest radius at which this PGD found an image of another class.

    Bisection on [0, eps_max] until the bracket is at most `tol` wide: at each midpoint, PGD
    with `steps` steps of `step_rel * radius` and `restarts` random starts (a sample counts as
    fooled as soon as any iterate of any restart is misclassified, iaat_eval.attack_correct).
    The answer is the upper end of the bracket: PGD found an image of another class at that
    radius (or at eps_max), so the true minimal radius is at most it. An exact attack would
    find it within `tol` below; a weaker one leaves the bound loose (a stronger attack only
    lowers it). Images misclassified clean get 0; inf only for images that neither the
    bisection nor a run at eps_max fooled (a fooling radius the bisection found is kept).
    Bisection assumes that a radius that fools also fools at any larger one, which holds for
    the exact minimum and nearly so for a strong attack. Runs in eval mode and FP32; the
    random starts come from torch's global generator (seed it for a repeatable answer)."""
    if not (eps_max > 0 and tol > 0):
        raise ValueError(f"eps_max and tol must be > 0, got {eps_max} and {tol}")
    kw = dict(steps=steps, restarts=restarts, step_size=lambda eps: step_rel * eps)
    out = []
    with model_mode(model, False), torch.autocast(y.device.type, enabled=False):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            with torch.no_grad():
                clean = model(xb).argmax(1) == yb
            lo = torch.zeros(len(yb), device=yb.device)
            hi = torch.full_like(lo, eps_max)
            never = attack_correct(model, xb, yb, eps=hi, **kw)  # not fooled even at eps_max
            for _ in range(math.ceil(math.log2(eps_max / tol))):
                mid = (lo + hi) / 2
                ok = attack_correct(model, xb, yb, eps=mid, **kw)
                lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
            hi[never & (hi >= eps_max)] = math.inf  # keep a fooling radius found below eps_max
            hi[~clean] = 0.0
            out.append(hi)
    return torch.cat(out)


def rank_by_radius(run, data_root: Optional[str] = None) -> dict:
    """The training images of an IAAT run folder sorted by their final radius eps_i, smallest
    first (ties by index): {"index", "label", "radius"} as numpy arrays, radius in [0,1] and
    label the one the run trained with (after --label-noise). IAATError on a folder that holds
    no IAAT checkpoint. Reads the radii from checkpoint.pt's eps memory; the labels from the
    data (CIFAR: from `data_root`, default where the run read it)."""
    run = Path(run)
    cfg, ckpt = run_config(run)
    if cfg.method != "iaat":
        raise IAATError(f"{run} was trained with --method {cfg.method}; only IAAT runs give each "
                        "image its own radius")
    data = load_data(dataclasses.replace(cfg, data_root=data_root or cfg.data_root), "cpu")
    radius = ckpt["eps_memory"].double().numpy()
    if len(radius) != len(data.train_y):
        raise IAATError(f"{run}: the eps memory holds {len(radius)} radii, the training set "
                        f"{len(data.train_y)} images")
    if ckpt["epoch"] < cfg.epochs:
        print(f"iaat rank: note: {run} holds epoch {ckpt['epoch']} of {cfg.epochs}",
              file=sys.stderr)
    order = np.lexsort((np.arange(len(radius)), radius))
    return {"index": order, "label": data.train_y.numpy()[order], "radius": radius[order]}


def write_ranking(run, out=None, data_root: Optional[str] = None) -> Path:
    """rank_by_radius as a CSV (index, label, radius_255: the radius in x/255), by default
    <run>/radius_ranking.csv; written atomically, so a failed call leaves no file. Returns
    its path."""
    ranking = rank_by_radius(run, data_root)
    out = Path(out) if out is not None else Path(run) / "radius_ranking.csv"

    def write(path: Path):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "label", "radius_255"])
            for i, label, r in zip(ranking["index"], ranking["label"], ranking["radius"]):
                w.writerow([int(i), int(label), f"{r * PIXEL:.4f}"])
    atomic_write(out, write)
    return out


def suspicion_scores(score: np.ndarray, flagged: np.ndarray, top: float = 0.05) -> dict:
    """How well a small `score` (a radius, or minus a loss) picks out the `flagged` images:
    {"auroc": area under the ROC curve of -score against flagged, "precision": the share of
    flagged images among the round(top * n) smallest scores, "tied": how many images share the
    score at that cut}. Images tied at the cut are taken in random order, so "precision" is its
    expected value: those below the cut count fully, the tied ones in proportion (a ranking
    that ties many images cannot pass for precise by the order of their indices)."""
    from sklearn.metrics import roc_auc_score
    score, flagged = np.asarray(score, np.float64), np.asarray(flagged, bool)
    k = max(1, round(top * len(score)))
    cut = np.sort(score)[k - 1]
    tied = np.isclose(score, cut, rtol=1e-6, atol=0)  # equal up to float rounding
    below = (score < cut) & ~tied
    expected = flagged[below].sum() + (k - below.sum()) * flagged[tied].mean()
    return {"auroc": float(roc_auc_score(flagged, -score)), "precision": float(expected / k),
            "tied": int(tied.sum())}


def main(argv=None) -> int:
    """`iaat rank RUN_DIR [--out FILE]`: write the run's radius ranking as a CSV."""
    p = CLIParser(prog="iaat rank", description="The training images of an IAAT run folder, sorted "
                  "by their final radius eps_i (smallest first), as a CSV with the columns index, "
                  "label (as trained, after --label-noise) and radius_255 (x/255).")
    p.add_argument("run", type=Path, help="run folder holding checkpoint.pt")
    p.add_argument("--out", type=Path, help="CSV file (default: RUN/radius_ranking.csv)")
    p.add_argument("--data-root", help="where CIFAR is read from (default: the run's)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = write_ranking(args.run, args.out, args.data_root)
    except (IAATError, OSError) as err:
        print(f"iaat: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
