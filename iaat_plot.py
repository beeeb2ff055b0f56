"""The plots of a training run, from its metrics rows and eps history: curves.png (loss,
accuracies), eps_hist.png (eps histograms, paper Fig 5) and eps_mean.png (the eps memory over
training, paper Fig 7). iaat.py writes them into each run folder; matplotlib's Figure, no
pyplot, so nothing global changes in a notebook. It imports iaat_run only, not iaat.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from iaat_run import atomic_write


def plot_run(out: Path, rows: list, history: np.ndarray, warmup: int = 0) -> None:
    """curves.png (loss, accuracies), eps_hist.png (eps histograms), eps_mean.png."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in notebooks
    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [r["train_loss"] for r in rows])
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss (Alg 1 l.11)")
    for key, label in [("train_acc", "train (on training inputs)"), ("val_clean", "held-out clean"),
                       ("val_pgd", "held-out PGD"), ("test_clean", "test clean"),
                       ("test_pgd", "test PGD (subset)")]:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), label=label, marker="." if len(pts) < 40 else None)
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax2.legend()
    save_figure(fig, out / "curves.png")

    h = history * 255  # x/255, the CLI's unit
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    picks = sorted({int(round(i)) for i in np.linspace(0, len(h) - 1, min(len(h), 5))})
    bins = np.linspace(0, max(h.max(), 1e-6), 40)
    for i in picks:
        ax.hist(h[i], bins=bins, histtype="step", label=f"after epoch {i + 1}")
    ax.set(xlabel="eps_i (x/255)", ylabel="training samples", title="eps memory (paper Fig 5)")
    ax.legend()
    save_figure(fig, out / "eps_hist.png")

    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(1, len(h) + 1)
    ax.fill_between(x, np.quantile(h, 0.1, axis=1), np.quantile(h, 0.9, axis=1), alpha=0.3,
                    label="10-90% of samples")
    ax.plot(x, h.mean(1), label="mean")
    if 0 < warmup < len(h):
        ax.axvline(warmup, color="gray", linestyle="--", label=f"end of warmup (epoch {warmup})")
    ax.set(xlabel="epoch", ylabel="eps (x/255)", title="eps memory over training (paper Fig 7)")
    ax.legend()
    save_figure(fig, out / "eps_mean.png")


def save_figure(fig, path: Path) -> None:
    """A matplotlib Figure as a PNG, written atomically (a kill leaves no half-written file)."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
