"""The notebooks' shared helpers: their run settings (`notebook_configs`, `shorten`), the
command that trains a run on the command line (`command_line`) and its settings in words
(`describe`), a finished run or a new one
(`train_or_load`), a run trained one epoch at a time with its training images' clean loss after
each (`loss_history`, `clean_losses`), and their findings checked or reported (`findings`).

    import iaat_notebook
    config = iaat_notebook.notebook_configs("digits", epochs=30)
    summary = iaat_notebook.train_or_load(config(method="at"))
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import iaat
import iaat_eval
from iaat import Config
from iaat_run import IAATError, atomic_write, changed_setting, read_checkpoint


def shorten(cfg: Config, epochs: Optional[int]) -> Config:
    """The same run in `epochs` epochs with its LR milestones scaled; None: as it is."""
    if not epochs:
        return cfg
    milestones = tuple(round(m * epochs / cfg.epochs) for m in cfg.lr_milestones)
    return iaat.check_config(dataclasses.replace(cfg, epochs=epochs, lr_milestones=milestones))


def command_line(cfg: Config, script: str = "iaat.py") -> str:
    """The `python iaat.py ...` command that trains `cfg`: its dataset, model (where it is not
    the dataset's default), method and seed, and every setting that differs from the preset,
    in the CLI's units."""
    model = [] if cfg.model == iaat.make_config(cfg.dataset).model else ["--model", cfg.model]
    words = ["python", script, "--dataset", cfg.dataset, *model, "--method", cfg.method,
             "--seed", str(cfg.seed)]
    for name, value in iaat.preset_changes(cfg, skip={"dataset", "method", "seed"}):
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            words += [flag, iaat.cli_value(name, value)]
    return " ".join(words)


def describe(cfg: Config) -> str:
    """The settings a run trains with, on one line, in the paper's terms and the CLI's units."""
    def px(v: float) -> str:
        return f"{v * 255:g}/255"
    method = {"iaat": f"IAAT: eps_w {px(cfg.eps_w)}, warmup {cfg.warmup} epochs, gamma "
                      f"{px(cfg.gamma)}, beta {cfg.beta:g}",
              "at": f"PGD-AT at eps {px(cfg.eps_w)}", "clean": "clean training",
              "trades": f"TRADES at eps {px(cfg.eps_w)}, beta {cfg.trades_beta:g}"}[cfg.method]
    method += f", TRADES loss (beta {cfg.trades_beta:g})" if cfg.loss == "trades" else ""
    method += f", weight average (decay {cfg.ema:g})" if cfg.ema else ""
    step = px(cfg.step_size) if cfg.step_rel is None else f"{cfg.step_rel:g} eps_i / k"
    noise = f"; {cfg.label_noise:.0%} of the labels flipped" if cfg.label_noise else ""
    return (f"{method}; PGD-{cfg.attack_steps}, step {step}; {cfg.model}, {cfg.epochs} epochs of "
            f"batch {cfg.batch_size}, LR {cfg.lr:g} x{cfg.lr_decay:g} at epochs "
            f"{', '.join(map(str, cfg.lr_milestones))}; seed {cfg.seed}{noise}")


def notebook_configs(dataset: str = "digits", *, model: Optional[str] = None,
                     epochs: Optional[int] = None, seed: int = 0, runs_dir="runs",
                     data_root: str = "data") -> Callable[..., Config]:
    """The notebooks' shared set-up: config(**settings), the preset for `dataset` and `model`
    (None: the dataset's) with these settings and `seed`, shortened to `epochs` (`shorten`;
    None: the preset's schedule), in `runs_dir` under the name `python iaat.py` gives it, so
    that runs made on the command line (say, CIFAR on a GPU) are found there."""
    def config(**settings) -> Config:
        cfg = shorten(iaat.make_config(dataset, model, seed=seed, data_root=data_root,
                                       **settings), epochs)
        return dataclasses.replace(cfg, out=str(Path(runs_dir) / iaat.run_dir(cfg).name))
    return config


def findings(claims: dict, strict: bool = True) -> None:
    """A notebook's findings, {claim: whether it holds}. strict (the digits runs the notebooks
    were written for): AssertionError naming the first claim that does not hold, else print
    "all findings hold". Otherwise (other runs: CIFAR, another schedule) print each claim with
    whether it holds on these runs."""
    failed = [claim for claim, holds in claims.items() if not holds]
    if strict:
        if failed:  # raised, not asserted: python -O must not turn the check off
            raise AssertionError(f"this finding does not hold: {failed[0]}")
        print("all findings hold")
    else:
        for claim, holds in claims.items():
            print(f"{'holds' if holds else 'does NOT hold'}: {claim}")


def train_or_load(cfg: Config, log: Optional[Callable[[str], None]] = None,
                  train_missing: bool = True) -> dict:
    """The summary of run_dir(cfg): from its summary.json if that run finished with these
    settings, else train (or resume) it, or with train_missing=False raise IAATError.
    Notebooks use it to render runs made elsewhere (say, CIFAR on a GPU)."""
    out = iaat.run_dir(cfg)
    if (out / "summary.json").is_file() and (out / "config.json").is_file():
        done = json.loads((out / "summary.json").read_text())
        saved = json.loads((out / "config.json").read_text())
        if done.get("epochs") == cfg.epochs and changed_setting(cfg, saved) is None:
            return done
    if not train_missing:
        raise IAATError(f"no finished run with these settings in {out}; train it first")
    return iaat.train(cfg, log or (lambda msg: None))


def finished(argv: list) -> bool:
    """Whether the run of `python iaat.py ARGV` finished with exactly these settings (the
    scripts' test before they train it)."""
    try:
        train_or_load(iaat.config_from_args(argv), train_missing=False)
        return True
    except IAATError:
        return False


def clean_losses(model, x_uint8: torch.Tensor, y: torch.Tensor, batch: int = 500) -> np.ndarray:
    """The clean cross-entropy of `model` (eval mode) on each image, in batches: (N,)."""
    with torch.no_grad():
        return torch.cat([F.cross_entropy(model(iaat.to_float(xb)), yb, reduction="none")
                          for xb, yb in zip(x_uint8.split(batch), y.split(batch))]).numpy()


def loss_history(cfg: Config, train_missing: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> Optional[np.ndarray]:
    """(epochs, training images): the clean cross-entropy of every training image, against the
    label it is trained on, after each epoch of the run `cfg`; a record of the whole run, as
    eps_history.npy is of the radii. The run is trained one epoch at a time: a run resumed at
    the end of an epoch ends bit for bit where an uninterrupted one does, so this is the run
    the command line trains. The record is kept beside it, as clean_loss_history.npy, and read
    back. None for a run trained without it (on the command line, say): the losses of its
    earlier models are gone."""
    out = iaat.run_dir(cfg)
    path = out / "clean_loss_history.npy"
    rows = list(np.load(path)) if path.is_file() else []
    if (out / "checkpoint.pt").is_file():
        saved = read_checkpoint(out / "checkpoint.pt")
        if (saved["epoch"], saved["step"]) != (len(rows), 0):
            return None  # trained without the record, or further than it
    if len(rows) == cfg.epochs:
        return np.stack(rows)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save on a name would append ".npy" to it
            np.save(f, np.stack(rows))
    data = None
    for epoch in range(len(rows) + 1, cfg.epochs + 1):
        train_or_load(dataclasses.replace(cfg, epochs=epoch), log, train_missing)
        data = data or iaat.load_data(cfg, "cpu")  # the labels as trained on (--label-noise)
        model = iaat_eval.load_model(out, "cpu", *iaat_eval.run_config(out))
        rows.append(clean_losses(model, data.train_x, data.train_y))
        atomic_write(path, save)
    return np.stack(rows)
