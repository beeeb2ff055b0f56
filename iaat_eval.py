"""The paper's evaluation protocol (Sec 4, Tables 1-4, Figs 4 and 9) on runs trained by iaat.py.

    python iaat.py eval runs/digits-smallcnn-iaat-seed0               # or: iaat eval RUN
    python iaat.py eval RUN --surrogate RUN_SEED1 --corruptions CIFAR-10-C/   # all columns

or from Python, with keyword arguments in pixel units ([0,1]):

    import iaat_eval
    res = iaat_eval.evaluate_run("runs/digits-smallcnn-iaat-seed0", parts={"whitebox"},
                                 n_examples=200)

White-box PGD (10x5, 100x5, 1000x2; each sample's worst case over restarts), transfer from an
independently trained surrogate, CIFAR-10-C corruptions (and ImageNet-C mCE), DeepFool,
MI-FGSM and CW40 (from torchattacks), standard AutoAttack (the reference implementation,
pyautoattack), the test-eps sweep (Fig 4) and the PGD-steps sweep (Fig 9). Every robust
accuracy counts an image only if it is classified correctly clean and under the attack.
Always FP32, model in eval mode. Also the run's training plots (curves, eps).
This module imports iaat; iaat.py imports it only when it evaluates or plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import iaat
import iaat_run
from iaat import (PIXEL, Config, IAATError, CLIParser, Step, atomic_write, ball, build_model,
                  clean_correct, input_grad, load_data, model_mode, per_sample, pgd_attack,
                  pgd_fooled, pick_device, read_checkpoint, step_per_sample, to_float,
                  uniform_start, write_json)


# ============================================================================================
# Attacks and accuracies: white-box PGD, transfer, Table 3's attacks, corruptions and mCE
# ============================================================================================

def take(v, idx: torch.Tensor):
    """A per-sample argument (a (B,) tensor) restricted to the samples idx; floats pass."""
    return v.to(idx.device)[idx] if torch.is_tensor(v) and v.dim() > 0 else v


def attack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps, steps: int,
                   step_size: Step, restarts: int = 1,
                   target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) bool: classified correctly on x and under the strongest of `restarts` PGD runs
    (paper Sec 4: PGD-10 x 5, PGD-100 x 5, PGD-1000 x 2, each sample's worst case).

    Untargeted, a sample is broken as soon as any iterate of any restart is misclassified
    (pgd_fooled): at least as strong as scoring each restart's last iterate, and every
    iterate is a valid adversarial image. Each restart attacks the survivors only.
    With `target` (random-targeted, the ImageNet protocol of Xie et al.), PGD moves towards
    the targets; a sample is broken when some restart's result is not classified as y.
    Runs in eval mode; call it in FP32 (outside autocast)."""
    with model_mode(model, False):
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        for _ in range(restarts):
            alive = ok.nonzero().flatten()
            if len(alive) == 0:
                break
            xa, ya, ea, sa = x[alive], y[alive], take(eps, alive), take(step_size, alive)
            if target is None:
                fooled = pgd_fooled(model, xa, ya, ea, steps=steps, step_size=sa)
            else:
                x_adv = pgd_attack(model, xa, target[alive], ea, steps=steps, step_size=sa,
                                   targeted=True)
                with torch.no_grad():
                    fooled = model(x_adv).argmax(1) != ya
            ok[alive[fooled]] = False
    return ok


def random_targets(y: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random class other than the true one, per sample (Xie et al. 2019)."""
    shift = torch.randint(1, num_classes, y.shape, generator=gen, device=gen.device)
    return (y + shift.to(y.device)) % num_classes


def pgd_steps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps, step_size: Step,
                    steps) -> torch.Tensor:
    """(len(steps), B) bool: correct under PGD-k for every k in `steps` (paper Fig 9), from one run.

    With a fixed step size, PGD-k is the first k steps of PGD-K from the same random start,
    so one run of max(steps) steps gives every point. As in attack_correct, a sample is broken
    from its first misclassified iterate on, so the curve cannot rise with k."""
    x = x.detach()
    eps_b = per_sample(eps, x)
    step = step_per_sample(step_size, eps_b, x)
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    rows, last = {}, max(steps)
    with model_mode(model, False):
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        # random starts for the clean-correct samples only, drawn like attack_correct's
        x_adv, start = x.clone(), ok.nonzero().flatten()
        x_adv[start] = uniform_start(x[start], eps_b[start])
        lo, hi = ball(x, eps_b)
        for t in range(last + 1):
            alive = ok.nonzero().flatten()
            if len(alive) and t < last:
                logits, grad, _ = input_grad(model, x_adv[alive], y[alive], False)
                x_adv[alive] = torch.clamp(x_adv[alive] + step[alive] * grad.sign(), lo[alive],
                                        hi[alive])
            elif len(alive):
                with torch.no_grad():
                    logits = model(x_adv[alive])
            if len(alive):
                ok[alive[logits.argmax(1) != y[alive]]] = False
            rows[t] = ok.clone()
    return torch.stack([rows[k] for k in steps])


def transfer_correct(model: nn.Module, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     eps, steps: int, step_size: Step, restarts: int = 1) -> torch.Tensor:
    """(B,) bool: correct on x and on the PGD images crafted on `surrogate`, an independently
    trained copy (paper Sec 4: PGD-1000 x 2; each sample keeps the surrogate's worst restart).
    Robust means correct on the clean image too: one the model gets wrong clean never counts,
    even where the surrogate's perturbation happens to move it back to its label."""
    with model_mode(surrogate, False):
        x_adv = pgd_attack(surrogate, x, y, eps, steps=steps, step_size=step_size,
                           restarts=restarts)
    with model_mode(model, False), torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


def cw_margin(logits: torch.Tensor, y: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y, the loss of CW-PGD (Madry et al.): summed
    over the batch, or per sample with reduction="none" (negative: classified correctly)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -float("inf")).amax(1)
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    return (other - true).sum() if reduction == "sum" else other - true


LIBRARY_ATTACKS = ("deepfool", "mifgsm", "cw40")


def library_attack(name: str, model: nn.Module, *, eps: float, step_size: float,
                   num_classes: int, seed: int = 0, steps: int = 10):
    """An attack from torchattacks, with the settings of paper Table 3:

    deepfool    DeepFool (L2, 50 steps, overshoot 0.02); the caller clips it into the eps-ball
    mifgsm      MI-FGSM (Dong et al.): 10 steps of eps/10, momentum decay 1.0
    cw40        PGD-40 on the CW margin loss, random start, step `step_size`
    pgd         torchattacks' PGD with `steps` (used to cross-check our pgd_attack)

    AutoAttack is not here: torchattacks' AutoAttack runs 10 iterations (see autoattack_correct).
    """
    import torchattacks as ta
    if name == "deepfool":
        return ta.DeepFool(model, steps=50, overshoot=0.02)
    if name == "mifgsm":
        return ta.MIFGSM(model, eps=eps, alpha=eps / 10, steps=10, decay=1.0)
    if name == "cw40":
        return ta.UPGD(model, eps=eps, alpha=step_size, steps=40, random_start=True, decay=0.0,
                       loss=lambda images, labels, _target: cw_margin(model(images), labels))
    if name == "pgd":
        return ta.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(LIBRARY_ATTACKS)}, pgd")


def library_correct(attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """(B,) bool: correct on x and on a torchattacks attack's images, clipped into the eps-ball
    (a no-op for the L-inf attacks; it bounds DeepFool's minimal L2 perturbation). An image
    misclassified clean never counts as robust, whatever the attack made of it."""
    with model_mode(model, False):
        x_adv = attack(x, y).detach()
        x_adv = torch.clamp(torch.where(torch.isfinite(x_adv), x_adv, x), *ball(x, eps))
        with torch.no_grad():
            return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


# ============================================================================================
# AutoAttack (Croce & Hein 2020), standard version, from the reference implementation
# ============================================================================================

# The stages of standard AutoAttack in the order it runs them (reference name -> title), and
# the parts of `iaat eval` that run them: `apgd` is the cheap quick look (its first two).
AUTOATTACK_STAGES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T",
                     "square": "Square"}
AUTOATTACK_PARTS = {"autoattack": tuple(AUTOATTACK_STAGES), "apgd": ("apgd-ce", "apgd-t")}
# The batch of the reference's run_standard_evaluation (its `bs`). The result depends on it
# (each batch draws its own random starts); at the same batch and seed it is the reference's.
AUTOATTACK_BATCH = 250


def reference_autoattack(model: nn.Module, *, eps: float, seed: int = 0):
    """The reference AutoAttack (fra31/auto-attack, packaged on PyPI as pyautoattack), standard
    version, L-inf: APGD-CE (100 iterations, 1 restart), APGD-T (100 iterations, the 9 most
    likely other classes), FAB-T (9 targets), Square (5000 queries). Its own settings, also on
    CIFAR-100; the model takes images in [0,1] (iaat's models normalise inside)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise IAATError("the autoattack and apgd parts need the reference AutoAttack: "
                        "pip install pyautoattack (in requirements.txt)") from None
    device = next(model.parameters()).device
    return AutoAttack(model, norm="Linf", eps=float(eps), version="standard", seed=seed,
                      device=device)


def autoattack_settings(aa) -> dict:
    """The settings each stage of a reference AutoAttack object will run with, read from it."""
    return {"apgd-ce": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts},
            "apgd-t": {"n_iter": aa.apgd_targeted.n_iter, "n_restarts": aa.apgd_targeted.n_restarts,
                       "n_target_classes": aa.apgd_targeted.n_target_classes},
            "fab-t": {"n_iter": aa.fab.n_iter, "n_restarts": aa.fab.n_restarts,  # 1 once run
                      "n_target_classes": aa.fab.n_target_classes},
            "square": {"n_queries": aa.square.n_queries, "p_init": aa.square.p_init}}


def _autoattack_stage(aa, stage: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One stage on one batch, set up exactly as AutoAttack.run_standard_evaluation does."""
    if stage == "apgd-ce":
        aa.apgd.loss, aa.apgd.seed = "ce", aa.get_seed()
        return aa.apgd.perturb(x, y)
    if stage == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    if stage == "fab-t":
        aa.fab.targeted, aa.fab.n_restarts, aa.fab.seed = True, 1, aa.get_seed()
        return aa.fab.perturb(x, y)
    if stage == "square":
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack stage {stage!r}; choose from "
                     f"{', '.join(AUTOATTACK_STAGES)}")


@contextmanager
def _frozen(model: nn.Module):
    """Parameters without requires_grad for a block: FAB's .backward() fills no parameter .grad
    (and computes none); the input gradient is unchanged."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Warnings(logging.Handler):
    """Collects the reference's warnings (its checks for gradient masking and the like)."""
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = {}

    def emit(self, record):
        msg = record.getMessage()
        self.seen[msg] = self.seen.get(msg, 0) + 1


def autoattack_correct(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, eps: float,
                       seed: int = 0, stages=tuple(AUTOATTACK_STAGES),
                       batch_size: int = AUTOATTACK_BATCH,
                       info: Optional[dict] = None) -> torch.Tensor:
    """(len(stages), B) bool: correct after each stage of standard AutoAttack, cumulatively
    (row s: not broken by stages 0..s), as the reference reports its robust accuracy.

    The reference's own attack objects and settings (reference_autoattack) and the loop of its
    run_standard_evaluation: each stage attacks the images still standing, in batches of
    `batch_size`, and so do its checks (randomised or dynamic model, logits, number of
    classes, zero gradients, Square). With the same seed and batch size the result is the
    reference's run_standard_evaluation(x, y, bs=batch_size), image by image; the default is
    the reference's own default, 250 (another size draws other random starts). Only all four
    stages are AutoAttack; fewer are recorded as such in `info`. x_u8: uint8 images,
    converted per batch. Eval mode, FP32. `info`, if given, receives the settings, the
    warnings, the largest L-inf perturbation and the seconds of each stage."""
    from pyautoattack import checks
    stages = tuple(stages)
    unknown = set(stages) - set(AUTOATTACK_STAGES)
    if unknown:
        raise ValueError(f"unknown AutoAttack stages {sorted(unknown)}")
    warned = _Warnings()
    with model_mode(model, False), _frozen(model), torch.autocast(y.device.type, enabled=False):
        aa = reference_autoattack(model, eps=eps, seed=seed)
        aa.logger.addHandler(warned)  # also keeps them off stderr (logging's last resort)
        try:
            first = to_float(x_u8[:batch_size])
            checks.check_randomized(aa.get_logits, first, y[:batch_size], bs=batch_size,
                                    logger=aa.logger)
            n_cls = checks.check_range_output(aa.get_logits, first, logger=aa.logger)
            tracer = sys.gettrace()  # check_dynamic sets a tracer and clears it (a debugger's too)
            checks.check_dynamic(model, first, False, logger=aa.logger)
            sys.settrace(tracer)
            checks.check_n_classes(n_cls, list(stages), aa.apgd_targeted.n_target_classes,
                                   aa.fab.n_target_classes, logger=aa.logger)
            rows, worst_linf, seconds = [], 0.0, {}
            with torch.no_grad():
                ok = torch.cat([model(to_float(x_u8[i])).argmax(1) == y[i]
                                for i in torch.arange(len(y), device=y.device).split(batch_size)])
                clean = ok.float().mean().item()
                for stage in stages:
                    t0 = time.time()
                    left = ok.nonzero().flatten()  # none left: no batch, as in the reference
                    for i in left.split(batch_size) if len(left) else ():
                        x = to_float(x_u8[i])
                        x_adv = _autoattack_stage(aa, stage, x, y[i])
                        fooled = model(x_adv).argmax(1) != y[i]
                        ok[i[fooled]] = False
                        worst_linf = max(worst_linf, (x_adv - x).abs().max().item())
                    rows.append(ok.clone())
                    seconds[stage] = round(time.time() - t0, 1)
            accs = {s: r.float().mean().item() for s, r in zip(stages, rows)}
            checks.check_square_sr({"clean": clean, **accs}, logger=aa.logger)
        finally:
            aa.logger.removeHandler(warned)
    if info is not None:
        from importlib.metadata import version
        full = stages == tuple(AUTOATTACK_STAGES)  # only all four stages are AutoAttack
        info.update(package=f"pyautoattack {version('pyautoattack')}",
                    version="standard" if full else "standard stages only: " + ", ".join(stages),
                    norm="Linf", seed=seed, batch_size=batch_size,
                    settings={s: autoattack_settings(aa)[s] for s in stages},
                    max_linf_255=worst_linf * PIXEL, seconds=seconds,
                    warnings=[f"{m} (x{n})" if n > 1 else m for m, n in warned.seen.items()])
    return torch.stack(rows)


# The 19 corruptions of CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019). The first 15
# are ImageNet-C's, scored by mCE against AlexNet's top-1 errors (mean over the 5 severities,
# as published in hendrycks/robustness).
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression",
               "speckle_noise", "gaussian_blur", "spatter", "saturate")
ALEXNET_ERR = dict(zip(CORRUPTIONS[:15], (
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
    0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500)))


def load_corruption(root, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One corruption in the published CIFAR-10-C layout: root/<name>.npy holds (5n, H, W, C)
    uint8 images, severities 1 to 5 stacked in that order; root/labels.npy the (5n,) labels.
    Returns the images as uint8 NCHW and the labels; severity s is rows (s-1)*n .. s*n."""
    root = Path(root)
    paths = [root / f"{name}.npy", root / "labels.npy"]
    for p in paths:
        if not p.is_file():
            raise IAATError(f"{p} not found (expected the CIFAR-10-C layout: one <corruption>.npy "
                            "per corruption and labels.npy)")
    try:
        x, y = (np.load(p, mmap_mode="r") for p in paths)
    except (ValueError, OSError, EOFError) as err:
        raise IAATError(f"cannot read {paths[0]} or labels.npy: {err}") from None
    x = x[..., None] if x.ndim == 3 else x  # a one-channel set may be stored (N, H, W)
    if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or \
            len(y) % 5 or len(y) == 0:
        raise IAATError(f"{paths[0]} holds {x.dtype} {tuple(x.shape)} with {len(y)} labels; "
                        "expected uint8 (5n, H, W, C) and 5n labels")
    return (torch.from_numpy(np.array(x.transpose(0, 3, 1, 2), order="C")),  # copies out of
            torch.from_numpy(np.array(y, dtype=np.int64)))                  # the memory map


def mean_corruption_error(errors: dict, baseline: Optional[dict] = None) -> tuple[float, dict]:
    """ImageNet-C mCE (Hendrycks & Dietterich 2019): CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}
    over the severities s = 1..5, and mCE = the mean of CE_c over the 15 corruptions.

    `errors` maps each corruption to its top-1 error at each severity (fractions); the baseline
    (default ALEXNET_ERR) holds each corruption's mean error over the severities. Returns
    (mCE, {corruption: CE}) as fractions: the paper's Table 4 prints them x100."""
    baseline = ALEXNET_ERR if baseline is None else baseline
    missing = [c for c in baseline if c not in errors]
    if missing:
        raise IAATError(f"mCE needs all {len(baseline)} corruptions; missing {', '.join(missing)}")
    ce = {c: float(np.mean(errors[c]) / baseline[c]) for c in baseline}
    return float(np.mean(list(ce.values()))), ce



# Table 1's protocol at 8/255 (paper Sec 4), and the same counts at the digits radius. Sweeps:
# test eps for Fig 4 (PGD-100 with step min(step, eps/4)), PGD iterations for Fig 9.
EVAL_PRESETS = {
    "paper": dict(eps=8 / PIXEL, step_size=2 / PIXEL, whitebox=((10, 5), (100, 5), (1000, 2)),
                  transfer=(1000, 2), sweep_attack=(100, 1),
                  eps_sweep=tuple(e / PIXEL for e in (0, 1, 2, 4, 6, 8, 10, 12, 14, 16)),
                  steps_sweep=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)),
    "digits": dict(eps=0.2, step_size=0.05, whitebox=((10, 5), (100, 5), (1000, 2)),
                   transfer=(1000, 2), sweep_attack=(100, 1),
                   eps_sweep=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
                   steps_sweep=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)),
}
EVAL_PARTS = ("whitebox", "transfer", "corruptions", "eps_sweep", "steps_sweep") + LIBRARY_ATTACKS \
    + tuple(AUTOATTACK_PARTS)
# left out of the default: apgd is the first half of autoattack (a quick look), and transfer
# and corruptions need their inputs
QUICK_PARTS = {"apgd", "transfer", "corruptions"}


# input channels and classes of each dataset: enough to rebuild a model from its checkpoint
DATASET_SHAPES = {"digits": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100)}


CHECKPOINTS = {"last": "checkpoint.pt", "best": "best.pt"}  # best: iaat.py --val-size


def run_config(run: Path, checkpoint: str = "last") -> tuple[Config, dict]:
    """The Config a run folder was trained with, and its last checkpoint or (`checkpoint`
    "best") the one with the best held-out PGD accuracy; checked, read with weights_only."""
    if checkpoint not in CHECKPOINTS:
        raise IAATError(f"checkpoint must be best or last, not {checkpoint!r}")
    path = run / CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not path.is_file() and (run / "checkpoint.pt").is_file():
        held_out = read_checkpoint(run / "checkpoint.pt")["config"].get("val_size")
        raise IAATError(f"{path} not found: " + ("no epoch of this run has finished yet" if held_out
                        else "only runs trained with --val-size N keep a best checkpoint; "
                        "evaluate the last one (--checkpoint last)"))
    if not path.is_file():
        raise IAATError(f"{path} not found; give the folder of a run trained by iaat.py")
    ckpt = read_checkpoint(path)
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in ckpt["config"].items() if k in known}
    values["lr_milestones"] = tuple(values.get("lr_milestones", ()))
    try:
        return Config(**values), ckpt
    except TypeError as err:
        raise IAATError(f"checkpoint {path} holds an incomplete config: {err}") from None


def load_model(run: Path, device, cfg: Config, ckpt: dict) -> nn.Module:
    """The run's trained model, in eval mode; its normalisation comes from the checkpoint."""
    if cfg.dataset not in DATASET_SHAPES:
        raise IAATError(f"{run}: unknown dataset {cfg.dataset!r} in the checkpoint")
    channels, classes = DATASET_SHAPES[cfg.dataset]
    model = build_model(cfg.model, classes, (0.0,) * channels, (1.0,) * channels)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise IAATError(f"the checkpoint in {run} does not fit model {cfg.model}: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval()


def load_run(run, device="cpu", data_root: Optional[str] = None,
             checkpoint: str = "last") -> tuple:
    """(model in eval mode, Config, Data, checkpoint epoch) of a run folder, in one call; CIFAR
    is read from `data_root` (default: where the run read it); `checkpoint`: last or best."""
    run, device = Path(run), torch.device(device)
    cfg, ckpt = run_config(run, checkpoint)
    data_cfg = dataclasses.replace(cfg, data_root=data_root) if data_root else cfg
    return load_model(run, device, cfg, ckpt), cfg, load_data(data_cfg, device), ckpt["epoch"]


def test_subset(n: int, n_examples: Optional[int], seed: int, device) -> torch.Tensor:
    """The test indices evaluated: all, or `n_examples` of them drawn with `seed` (sorted)."""
    if n_examples is None or n_examples >= n:
        return torch.arange(n, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:n_examples].sort().values.to(device)


def _batched(fn, x_u8, y, batch_size: int, desc: str) -> torch.Tensor:
    """fn(x, y, idx) -> bool (..., B) over batches of the examples (idx: their positions),
    concatenated; with a progress bar on a terminal."""
    from tqdm import tqdm  # the plain bar: silent outside a terminal, notebooks included
    batches = torch.arange(len(y), device=y.device).split(batch_size)
    return torch.cat([fn(to_float(x_u8[i]), y[i], i)
                      for i in tqdm(batches, desc=desc, leave=False, disable=None)], dim=-1)


def _name(steps: int, restarts: int) -> str:
    return f"PGD-{steps}x{restarts}"


def run_evaluation(model, x_u8, y, *, ev: dict, num_classes: int, surrogate=None,
                   corruptions: Optional[Path] = None, target: Optional[torch.Tensor] = None,
                   progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Every part of the protocol in ev["parts"] on the images x_u8 (uint8) and labels y.

    Returns plain numbers (accuracies as fractions) and the per-sample worst case over every
    white-box attack that ran. `target` makes the white-box PGD rows random-targeted (the
    other parts stay untargeted). Each part reseeds torch with ev["seed"], so a part's result
    does not depend on which others ran. `progress` receives the results so far after each
    part (a long CIFAR evaluation keeps what it has measured). res["flags"] holds the
    sanity flags (sanity_flags) raised by the results."""
    with torch.autocast(y.device.type, enabled=False):  # FP32 even inside a caller's autocast
        res = _run_parts(model, x_u8, y, ev, num_classes, surrogate, corruptions, target,
                         progress or (lambda res: None))
    res["flags"] = sanity_flags(dict(res, eps_255=ev["eps"] * PIXEL, n_examples=len(y),
                                     targeted="none" if target is None else "random"))
    return res


def _run_parts(model, x_u8, y, ev, num_classes, surrogate, corruptions, target, progress):
    eps, step, bs, parts = ev["eps"], ev["step_size"], ev["batch_size"], ev["parts"]
    res, worst, seconds = {}, None, {}

    def timed(part, fn):
        progress(dict(res, seconds=seconds))
        torch.manual_seed(ev["seed"])
        t0 = time.time()
        out = fn()
        seconds[part] = round(time.time() - t0, 1)
        return out

    def batched(fn, desc):
        return _batched(fn, x_u8, y, bs, desc)

    natural = timed("natural", lambda: batched(
        lambda x, t, _: clean_correct(model, x, t), "natural"))
    res["natural"], worst = natural.float().mean().item(), natural.clone()
    if "whitebox" in parts:
        res["whitebox"] = {}
        for k, r in ev["whitebox"]:
            ok = timed(_name(k, r), lambda: batched(
                lambda x, t, i: attack_correct(model, x, t, eps=eps, steps=k, step_size=step,
                                               restarts=r, target=None if target is None
                                               else target[i]), _name(k, r)))
            res["whitebox"][_name(k, r)], worst = ok.float().mean().item(), worst & ok
    if "transfer" in parts:
        k, r = ev["transfer"]
        ok = timed("transfer", lambda: batched(lambda x, t, _: transfer_correct(
            model, surrogate, x, t, eps=eps, steps=k, step_size=step, restarts=r),
            f"transfer {_name(k, r)}"))
        res["transfer"] = ok.float().mean().item()
    for name in LIBRARY_ATTACKS:
        if name in parts:
            attack = library_attack(name, model, eps=eps, step_size=step, num_classes=num_classes,
                                    seed=ev["seed"])
            ok = timed(name, lambda: batched(
                lambda x, t, _: library_correct(attack, model, x, t, eps), name))
            res[name], worst = ok.float().mean().item(), worst & ok
    for name, stages in AUTOATTACK_PARTS.items():
        if name in parts:
            info = {}
            rows = timed(name, lambda: autoattack_correct(
                model, x_u8, y, eps=eps, seed=ev["seed"], stages=stages,
                batch_size=ev.get("autoattack_batch_size", AUTOATTACK_BATCH), info=info))
            res[name], worst = rows[-1].float().mean().item(), worst & rows[-1]
            res[f"{name}_stages"] = {AUTOATTACK_STAGES[s]: r.float().mean().item()
                                     for s, r in zip(stages, rows)}
            res[f"{name}_details"] = info
    if "corruptions" in parts:
        res["corruptions"] = timed("corruptions", lambda: corruption_accuracy(
            model, corruptions, ev, x_u8.shape[1:], num_classes))
    if "eps_sweep" in parts:
        k, r = ev["sweep_attack"]
        accs = []
        for e in ev["eps_sweep"]:
            ok = timed(f"eps {e * PIXEL:g}", lambda: batched(
                lambda x, t, _: attack_correct(model, x, t, eps=e, steps=k, restarts=r,
                                               step_size=min(step, e / 4)),
                f"eps sweep {e * PIXEL:g}/255"))
            accs.append(ok.float().mean().item())
        res["eps_sweep"] = {"attack": _name(k, r), "eps_255": [e * PIXEL for e in ev["eps_sweep"]],
                            "acc": accs}
    if "steps_sweep" in parts:
        ok = timed("steps_sweep", lambda: batched(
            lambda x, t, _: pgd_steps_sweep(model, x, t, eps=eps, step_size=step,
                                            steps=ev["steps_sweep"]), "PGD steps sweep"))
        res["steps_sweep"] = {"steps": list(ev["steps_sweep"]),
                              "acc": ok.float().mean(1).tolist()}
    if parts & {"whitebox", *LIBRARY_ATTACKS, *AUTOATTACK_PARTS}:
        res["worst_case"] = worst.float().mean().item()
    res["seconds"] = seconds
    return res


def corruption_accuracy(model, root: Path, ev: dict, shape, num_classes: int) -> dict:
    """Natural accuracy on each corruption and severity (CIFAR-10-C layout), and the mean over
    all of them (paper Table 1's corruption column). With n_examples, the same subset of
    each severity block is used."""
    per = {}
    device = next(model.parameters()).device
    for name in CORRUPTIONS:
        x_all, y_all = load_corruption(root, name)
        if tuple(x_all.shape[1:]) != tuple(shape):
            raise IAATError(f"{root / name}.npy holds images of shape {tuple(x_all.shape[1:])} "
                            f"(C, H, W); the model takes {tuple(shape)}")
        if int(y_all.min()) < 0 or int(y_all.max()) >= num_classes:
            raise IAATError(f"{root}/labels.npy holds labels {int(y_all.min())}-{int(y_all.max())}"
                            f"; the model has {num_classes} classes (CIFAR-10-C vs CIFAR-100-C?)")
        n = len(y_all) // 5
        pick = test_subset(n, ev["n_examples"], ev["seed"], "cpu")
        accs = []
        for s in range(5):
            idx = s * n + pick
            ok = _batched(lambda x, t, _: clean_correct(model, x, t), x_all[idx].to(device),
                          y_all[idx].to(device), ev["batch_size"], f"{name} severity {s + 1}")
            accs.append(ok.float().mean().item())
        per[name] = accs
    return {"mean": float(np.mean([a for v in per.values() for a in v])), "per_corruption": per}


# the columns of paper Tables 1 and 3 after natural and the white-box PGD rows: (key, title)
TABLE_COLUMNS = (("transfer", "transfer"), ("corruptions", "corruption"), ("deepfool", "DeepFool"),
                 ("mifgsm", "MI-FGSM"), ("cw40", "CW40"), ("apgd", "APGD-CE+T"),
                 ("autoattack", "AutoAttack"), ("worst_case", "worst case"))


def _stage_cells(r: dict, key: str, title: str) -> dict:
    """The robust accuracy after each stage but the last (the reference's report), then the part's
    own column. An eval.json written before the reference AutoAttack holds torchattacks' weaker
    10-iteration version, and says so in its title."""
    if key == "autoattack" and f"{key}_details" not in r:
        return {"AutoAttack (torchattacks, 10 iterations)": r[key]}
    stages = list(r.get(f"{key}_stages", {}).items())[:-1]
    prefix = "AA after " if key == "autoattack" else ""
    return {**{prefix + t: v for t, v in stages}, title: r[key]}


def table_cells(r: dict) -> dict:
    """Column title -> accuracy in % of one evaluation result, in the order of Tables 1 and 3."""
    cells = {"natural": r["natural"], **r.get("whitebox", {})}
    for key, title in TABLE_COLUMNS:
        if key in AUTOATTACK_PARTS and key in r:
            cells.update(_stage_cells(r, key, title))
        elif key in r:
            cells[title] = r[key]["mean"] if isinstance(r[key], dict) else r[key]
    return {k: 100 * v for k, v in cells.items()}


def eval_table(rows: list) -> str:
    """Markdown: one row per evaluated run, the columns that ran, and the sanity flags raised."""
    titles = list(dict.fromkeys(t for r in rows for t in table_cells(r)))
    flags = any("flags" in r for r in rows)
    lines = ["| run | " + " | ".join(titles) + (" | flags |" if flags else " |"),
             "|" + " --- |" * (len(titles) + 1 + flags)]
    for r in rows:
        cells = table_cells(r)
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{cells[t]:.2f}" if t in cells else "-" for t in titles) + " |" + (
            f" {', '.join(f['flag'] for f in r.get('flags', [])) or 'none'} |" if flags else ""))
    return "\n".join(lines)


def stage_notes(r: dict) -> str:
    """What the AutoAttack columns are, under the table."""
    out = []
    if "autoattack_details" in r:
        d = r["autoattack_details"]
        out.append(f"AutoAttack: standard version of the reference implementation "
                   f"({d['package']}), L-inf; 'AA after X' is its robust accuracy after its "
                   "attacks up to X, run in turn on the images still standing (APGD-CE, APGD-T, "
                   "FAB-T, Square); the AutoAttack column is after all four.")
    if "apgd_details" in r:
        out.append("APGD-CE+T: the first two attacks of standard AutoAttack only (a quick look, "
                   "not AutoAttack): APGD-CE then APGD-T, 100 iterations each.")
    return "\n".join(out)


# ---------------------------------------------------------------- sanity flags

# What each flag means and what to try (Carlini et al. 2019, "On evaluating adversarial
# robustness"; Croce & Hein 2020, and the reference's own checks, flags_doc.md).
FLAGS = {
    "transfer_beats_whitebox": (
        "images crafted on another model fool this one more often than white-box PGD on this "
        "model itself: its gradients mislead the attack (gradient masking), so the white-box "
        "numbers overstate robustness",
        "trust the lower number; run autoattack (its Square stage needs no gradients); look for "
        "non-differentiable or saturating layers and attack through a smooth approximation (BPDA)"),
    "square_beats_gradient_attacks": (
        "Square, a black-box attack, breaks images that APGD-CE, APGD-T and FAB-T left standing: "
        "the gradient attacks are being misled (gradient masking)",
        "trust AutoAttack's final number, not the PGD ones; run Square with more queries and "
        "restarts, or an adaptive attack (Tramer et al. 2020)"),
    "eps_sweep_rises": (
        "accuracy rises as the test radius grows, although every image inside a small ball is "
        "also inside the larger one: the attack fails at large radii (masking, or a step size "
        "that does not fit the radius)",
        "check the sweep's step size, run more steps and restarts at the large radii"),
    "eps_sweep_does_not_fall": (
        "accuracy does not fall towards 0 as the test radius grows: at twice the evaluation "
        "radius an attack should break most images, and it breaks fewer than half of those the "
        "model classifies correctly (a sign of gradient masking)",
        "extend the sweep to larger radii; try a gradient-free attack (Square, in autoattack) "
        "or a transfer attack at the largest radius"),
    "autoattack_above_pgd": (
        "AutoAttack leaves more images standing than our PGD: the stronger attack should be at "
        "most PGD's accuracy; the model may be randomised, output probabilities instead of "
        "logits, or its loss surface may defeat APGD's step-size rule",
        "read the reference's warnings in the JSON (autoattack_details.warnings); for a "
        "randomised model use version='rand' (EOT); report the lower number"),
    "apgd_above_pgd": (
        "APGD-CE+T (the first two attacks of standard AutoAttack, not AutoAttack) leaves more "
        "images standing than our PGD: the model may be randomised, output probabilities "
        "instead of logits, or its loss surface may defeat APGD's step-size rule",
        "read the reference's warnings in the JSON (apgd_details.warnings); run the full "
        "autoattack part; report the lower number"),
    "attack_not_converged": (
        "a stronger setting of the same attack (tenfold the steps, or more restarts) still "
        "lowers accuracy a lot: the attack has not converged and the reported accuracy is an "
        "overestimate",
        "run more steps and restarts until accuracy stops falling (the steps sweep shows where); "
        "report the strongest result"),
    "autoattack_warning": (
        "the reference AutoAttack's own checks warned (its flags_doc.md): e.g. a randomised or "
        "dynamic model, outputs that look like probabilities, or inputs with zero gradient",
        "read the warning in the JSON (autoattack_details.warnings) and follow flags_doc.md of "
        "fra31/auto-attack"),
    "apgd_warning": (
        "the reference's own checks warned while running APGD-CE+T (its flags_doc.md): e.g. a "
        "randomised or dynamic model, outputs that look like probabilities, or inputs with "
        "zero gradient",
        "read the warning in the JSON (apgd_details.warnings) and follow flags_doc.md of "
        "fra31/auto-attack"),
}


def sanity_flags(r: dict) -> list:
    """The signs of gradient masking or of an unconverged attack in one evaluation result (a
    pure function of the results dict, as in eval.json). Each flag: {"flag", "evidence",
    "meaning", "try"}. Differences count only above the noise: max(2 images, 1 point).

    - transfer_beats_whitebox: transfer below the strongest white-box PGD (untargeted only);
    - square_beats_gradient_attacks: AutoAttack's Square stage lowers its accuracy further;
    - eps_sweep_rises: accuracy higher at a larger test radius;
    - eps_sweep_does_not_fall: at the largest radius (at least twice the evaluation radius)
      accuracy above half the natural accuracy;
    - autoattack_above_pgd, apgd_above_pgd: AutoAttack, or APGD-CE+T (its first two attacks
      only, never called AutoAttack), above the strongest white-box PGD;
    - attack_not_converged: among the PGD runs with at least a tenth of the most steps any ran
      (the last tenfold of the effort), one with at least as many steps and restarts as another
      below it by more than max(2 points, 10% of the weaker's accuracy); the steps sweep
      counts as PGD-k x 1;
    - autoattack_warning, apgd_warning: the reference's own checks warned in that part."""
    n = r.get("n_examples") or 0
    tol = max(2 / n if n else 0.0, 0.01)
    out = []

    def flag(name, evidence):
        out.append({"flag": name, "evidence": evidence, "meaning": FLAGS[name][0],
                    "try": FLAGS[name][1]})

    pct = lambda v: f"{100 * v:.2f}%"
    white = r.get("whitebox", {})
    strongest = min(white.items(), key=lambda kv: kv[1]) if white else None
    if strongest and "transfer" in r and r.get("targeted", "none") == "none" and \
            r["transfer"] < strongest[1] - tol:
        flag("transfer_beats_whitebox", f"transfer {pct(r['transfer'])} < {strongest[0]} "
             f"{pct(strongest[1])}")
    stages = r.get("autoattack_stages", {})
    if "Square" in stages and len(stages) > 1:
        before = list(stages.values())[-2]
        if stages["Square"] < before - tol:
            flag("square_beats_gradient_attacks", f"after FAB-T {pct(before)}, after Square "
                 f"{pct(stages['Square'])}")
    if "eps_sweep" in r:
        eps, acc = r["eps_sweep"]["eps_255"], r["eps_sweep"]["acc"]
        order = sorted(range(len(eps)), key=lambda i: eps[i])
        rises = [(eps[a], acc[a], eps[b], acc[b]) for a, b in zip(order, order[1:])
                 if acc[b] > acc[a] + tol]
        if rises:
            flag("eps_sweep_rises", "; ".join(f"{pct(p)} at {e:g}/255 -> {pct(q)} at {f:g}/255"
                                               for e, p, f, q in rises))
        top = order[-1] if order else None
        if top is not None and r.get("eps_255") and eps[top] >= 2 * r["eps_255"] and \
                acc[top] > 0.5 * r["natural"] + tol:
            flag("eps_sweep_does_not_fall", f"{pct(acc[top])} at {eps[top]:g}/255, natural "
                 f"{pct(r['natural'])}")
    if strongest:
        for key, title in (("autoattack", "AutoAttack"), ("apgd", "APGD-CE+T")):
            if key in r and f"{key}_details" in r and r[key] > strongest[1] + tol:
                flag(f"{key}_above_pgd", f"{title} {pct(r[key])} > {strongest[0]} "
                     f"{pct(strongest[1])}")
    runs = [(_pgd_counts(k), v) for k, v in white.items()]
    if "steps_sweep" in r:
        runs += [((s, 1), v) for s, v in zip(r["steps_sweep"]["steps"], r["steps_sweep"]["acc"])]
    worst_gap, most_steps = None, max((k for (k, _), _ in runs), default=0)
    for (ks, rs), weak in runs:
        for (kb, rb), strong in runs:
            if kb >= ks and rb >= rs and (kb, rb) != (ks, rs) and 10 * ks >= most_steps and \
                    weak - strong > max(0.02, tol, 0.1 * weak) and \
                    (worst_gap is None or weak - strong > worst_gap[0]):
                worst_gap = (weak - strong, f"{_name(ks, rs)} {pct(weak)} -> {_name(kb, rb)} "
                             f"{pct(strong)}")
    if worst_gap:
        flag("attack_not_converged", worst_gap[1])
    for key in AUTOATTACK_PARTS:
        if r.get(f"{key}_details", {}).get("warnings"):
            flag(f"{key}_warning", "; ".join(r[f"{key}_details"]["warnings"]))
    return out


def _pgd_counts(name: str) -> tuple:
    """'PGD-100x5' -> (100, 5)."""
    steps, restarts = name.removeprefix("PGD-").split("x")
    return int(steps), int(restarts)


def flag_notes(r: dict) -> str:
    """The sanity flags in words, under the table."""
    flags = r.get("flags", [])
    if not flags:
        return "Sanity flags: none raised." if "flags" in r else ""
    return "Sanity flags (signs of gradient masking or an unconverged attack):\n" + "\n".join(
        f"- {f['flag']}: {f['evidence']}. Means: {f['meaning']}. Try: {f['try']}." for f in flags)


def sweep_tables(r: dict) -> str:
    out = []
    if "eps_sweep" in r:
        s = r["eps_sweep"]
        out += [f"\nTest-eps sweep ({s['attack']}, paper Fig 4):\n",
                "| eps (/255) | " + " | ".join(f"{e:g}" for e in s["eps_255"]) + " |",
                "|" + " --- |" * (len(s["acc"]) + 1),
                "| accuracy (%) | " + " | ".join(f"{100 * a:.2f}" for a in s["acc"]) + " |"]
    if "steps_sweep" in r:
        s = r["steps_sweep"]
        out += [f"\nPGD-iteration sweep at {r['eps_255']:g}/255 (paper Fig 9):\n",
                "| PGD steps | " + " | ".join(map(str, s["steps"])) + " |",
                "|" + " --- |" * (len(s["acc"]) + 1),
                "| accuracy (%) | " + " | ".join(f"{100 * a:.2f}" for a in s["acc"]) + " |"]
    return "\n".join(out)


def plot_sweeps(r: dict, out: Path, stem: str) -> list:
    """<stem>_eps_sweep.png (Fig 4) and <stem>_steps_sweep.png (Fig 9); returns the paths."""
    from matplotlib.figure import Figure
    written = []
    for key, xkey, xlabel, title, log_x in (
            ("eps_sweep", "eps_255", "test eps (x/255)", "robust accuracy over test eps (Fig 4)",
             False),
            ("steps_sweep", "steps", "PGD steps", "robust accuracy over PGD steps (Fig 9)", True)):
        if key not in r:
            continue
        fig = Figure(figsize=(5, 3.4), layout="constrained")
        ax = fig.subplots()
        ax.plot(r[key][xkey], [100 * a for a in r[key]["acc"]], marker="o", label=r["label"])
        ax.set(xlabel=xlabel, ylabel="accuracy (%)", title=title, ylim=(0, 100))
        if log_x:
            ax.set_xscale("log")
        ax.legend()
        path = out / f"{stem}_{key}.png"
        _save_figure(fig, path)
        written.append(path)
    return written




# ============================================================================================
# The evaluation run: load, evaluate, print the table, write JSON, markdown and plots
# ============================================================================================

def eval_settings(dataset: str, *, preset: Optional[str] = None, parts=None, eps=None,
                  step_size=None, whitebox=None, transfer=None, eps_sweep=None,
                  sweep_attack=None, steps_sweep=None, targeted: str = "none",
                  n_examples: Optional[int] = None, seed: int = 0, batch_size: int = 500,
                  autoattack_batch_size: int = AUTOATTACK_BATCH, surrogate=None,
                  corruptions=None) -> dict:
    """The preset for the run's dataset (digits, or the paper's for CIFAR), overridden by the
    settings given (radii in [0,1]); IAATError on a bad combination, before any work."""
    ev = dict(EVAL_PRESETS[preset or ("digits" if dataset == "digits" else "paper")])
    given = dict(eps=eps, step_size=step_size, whitebox=whitebox, transfer=transfer,
                 eps_sweep=eps_sweep, sweep_attack=sweep_attack, steps_sweep=steps_sweep)
    ev.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None})
    parts = set(parts) if parts else set(EVAL_PARTS) - QUICK_PARTS | (
        {"transfer"} if surrogate else set()) | ({"corruptions"} if corruptions else set())
    unknown = parts - set(EVAL_PARTS)
    if unknown:
        raise IAATError(f"unknown --parts {', '.join(sorted(unknown))}; choose from "
                        f"{', '.join(EVAL_PARTS)}")
    if "transfer" in parts and not surrogate:
        raise IAATError("--parts transfer needs --surrogate RUN_DIR")
    if "corruptions" in parts and not corruptions:
        raise IAATError("--parts corruptions needs --corruptions DIR")
    if ev["step_size"] <= 0 or (n_examples is not None and n_examples < 1) or batch_size < 1 \
            or autoattack_batch_size < 1:
        raise IAATError("--step-size, --n-examples, --batch-size and --autoattack-batch-size "
                        "must be positive")
    if targeted not in ("none", "random"):
        raise IAATError(f"targeted must be none or random, not {targeted!r}")
    import importlib.util  # the attack libraries: checked now, not after hours of PGD
    for names, module, what in ((LIBRARY_ATTACKS, "torchattacks", "DeepFool, MI-FGSM and CW40"),
                                (AUTOATTACK_PARTS, "pyautoattack", "autoattack and apgd")):
        if parts & set(names) and importlib.util.find_spec(module) is None:
            raise IAATError(f"the {what} parts need {module} (pip install -r requirements.txt), "
                            "or leave them out with --parts")
    ev.update(parts=parts, targeted=targeted, n_examples=n_examples, seed=seed,
              batch_size=batch_size, autoattack_batch_size=autoattack_batch_size)
    return ev


def evaluate_run(run, *, surrogate=None, corruptions=None, name: Optional[str] = None,
                 checkpoint: str = "last", device: str = "auto", data_root: Optional[str] = None,
                 download: Optional[bool] = None, **settings) -> dict:
    """The evaluation of a run folder, as `iaat eval RUN`: load its last checkpoint (or with
    checkpoint="best", --val-size's best on the held-out images), run every part
    (eval_settings: parts, eps, step_size, whitebox, transfer, eps_sweep, sweep_attack,
    steps_sweep, targeted, n_examples, seed, batch_size, autoattack_batch_size, preset; radii
    in [0,1]), print the table and write <run>/<name>.json (default name: eval, or eval_best;
    rewritten after every part, with "complete": false until the end), .md and the sweep plots.
    Returns the results."""
    run = Path(run)
    surrogate = Path(surrogate) if surrogate is not None else None
    corruptions = Path(corruptions) if corruptions is not None else None
    cfg, ckpt = run_config(run, checkpoint)
    name = name or ("eval" if checkpoint == "last" else "eval_best")
    ev = eval_settings(cfg.dataset, surrogate=surrogate, corruptions=corruptions, **settings)
    if surrogate is not None and surrogate.resolve() == run.resolve():
        raise IAATError("--surrogate must be another run (an independently trained copy)")
    device = pick_device(device)
    model = load_model(run, device, cfg, ckpt)
    surrogate_model = None
    if "transfer" in ev["parts"]:
        scfg, sckpt = run_config(surrogate)
        if (scfg.dataset, scfg.split_seed) != (cfg.dataset, cfg.split_seed):
            raise IAATError(f"the surrogate was trained on {scfg.dataset} (split {scfg.split_seed}),"
                            f" the model on {cfg.dataset} (split {cfg.split_seed})")
        surrogate_model = load_model(surrogate, device, scfg, sckpt)
    if data_root is not None or download is not None:
        cfg = dataclasses.replace(cfg, data_root=data_root or cfg.data_root,
                                  download=cfg.download if download is None else download)
    data = load_data(cfg, device)
    idx = test_subset(len(data.test_y), ev["n_examples"], ev["seed"], device)
    target = None
    if ev["targeted"] == "random":  # drawn for the whole test set on the CPU: the same targets
        target = random_targets(data.test_y.cpu(), data.num_classes,  # on any device and subset
                                torch.Generator().manual_seed(ev["seed"])).to(device)[idx]
    if ckpt["epoch"] < cfg.epochs and checkpoint == "last":
        print(f"iaat eval: note: {run} holds epoch {ckpt['epoch']} of {cfg.epochs}",
              file=sys.stderr)
    if checkpoint == "best" and not (run / "summary.json").is_file():
        print(f"iaat eval: note: {run} has not finished training: a later epoch may still "
              "replace its best.pt", file=sys.stderr)
    which = "" if checkpoint == "last" else f" (best: epoch {ckpt['epoch']})"
    head = {"label": f"{cfg.dataset} {cfg.model} {cfg.method} seed {cfg.seed}{which}",
            "run": str(run), "checkpoint": checkpoint, "checkpoint_epoch": ckpt["epoch"],
            "epochs": cfg.epochs,
            "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method, "seed": cfg.seed,
            "eps_255": ev["eps"] * PIXEL, "step_size_255": ev["step_size"] * PIXEL,
            "targeted": ev["targeted"], "n_examples": len(idx), "eval_seed": ev["seed"],
            "surrogate": str(surrogate) if surrogate_model is not None else None,
            "corruptions_dir": str(corruptions) if "corruptions" in ev["parts"] else None,
            "device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__}
    json_path = run / f"{name}.json"
    res = run_evaluation(model, data.test_x[idx], data.test_y[idx], ev=ev,
                         num_classes=data.num_classes, surrogate=surrogate_model,
                         corruptions=corruptions, target=target,
                         progress=lambda part: write_json(json_path, {**head, **part,
                                                                      "complete": False}))
    res = {**head, **res, "complete": True}
    text = (f"Evaluation of {run} ({checkpoint} checkpoint, epoch {ckpt['epoch']} of "
            f"{cfg.epochs}) at eps {ev['eps'] * PIXEL:g}/255, step "
            f"{ev['step_size'] * PIXEL:g}/255, {len(idx)} test images, seed {ev['seed']}"
            f"{', random-targeted white-box PGD' if target is not None else ''} (accuracy, %):\n\n"
            + eval_table([res]) + "\n\n" + "\n\n".join(filter(None, (
                stage_notes(res), flag_notes(res)))) + "\n" + sweep_tables(res) + "\n")
    print(text)
    write_json(json_path, res)
    atomic_write(run / f"{name}.md", lambda p: p.write_text(text))
    plot_sweeps(res, run, name)
    return res


# ============================================================================================
# The CLI: `iaat eval RUN_DIR [flags]` (also `python iaat.py eval ...`)
# ============================================================================================

def _pairs(text: str) -> tuple:
    """'10x5,100x5' -> ((10, 5), (100, 5))."""
    try:
        pairs = tuple(tuple(int(v) for v in p.split("x")) for p in text.split(","))
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected STEPSxRESTARTS[,...] such as 10x5, got {text!r}")
    return pairs


def _pair(text: str) -> tuple:
    """'1000x2' -> (1000, 2)."""
    pairs = _pairs(text)
    if len(pairs) != 1:
        raise argparse.ArgumentTypeError(f"expected one STEPSxRESTARTS such as 1000x2, got {text!r}")
    return pairs[0]


def _numbers(kind, least: float = 0, single: bool = False):
    """A parser of 'a,b,c' (or of one number with `single`), each finite and >= least."""
    def parse(text: str):
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or (single and len(values) > 1) or \
                any(not math.isfinite(v) or v < least for v in values):
            many = "a number" if single else "comma-separated numbers"
            raise argparse.ArgumentTypeError(f"expected {many} >= {least:g}, got {text!r}")
        return values[0] if single else values
    return parse


def build_eval_parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="iaat eval", description="The paper's evaluation protocol (Sec 4, Tables 1-4, "
                "Figs 4 and 9) on a run folder written by iaat.py; writes <run>/<name>.json, "
                ".md and sweep plots. Always FP32, model in eval mode.",
                epilog="presets:\n" + "\n".join(
                    f"  {k}: eps {v['eps'] * PIXEL:g}/255, step {v['step_size'] * PIXEL:g}/255, "
                    f"whitebox {','.join(_name(*w) for w in v['whitebox'])}, transfer "
                    f"{_name(*v['transfer'])}" for k, v in EVAL_PRESETS.items()),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder holding checkpoint.pt")
    p.add_argument("--surrogate", type=Path, help="run folder of an independently trained copy, "
                   "the source of the transfer attack")
    p.add_argument("--corruptions", type=Path, help="folder in the CIFAR-10-C / CIFAR-100-C layout "
                   "(<corruption>.npy per corruption, labels.npy)")
    p.add_argument("--preset", choices=EVAL_PRESETS, help="default: digits for digits runs, "
                   "paper otherwise")
    p.add_argument("--parts", type=lambda s: set(s.split(",")), help="comma-separated subset of "
                   f"{','.join(EVAL_PARTS)} (default: all but apgd, the quick look at AutoAttack's "
                   "first half; transfer and corruptions when their inputs are given)")
    p.add_argument("--eps", type=_numbers(float, single=True), help="test radius [x/255]")
    p.add_argument("--step-size", type=_numbers(float, single=True),
                   help="PGD step size [x/255]")
    p.add_argument("--whitebox", type=_pairs, help="white-box PGD attacks, e.g. 10x5,100x5,1000x2")
    p.add_argument("--transfer", type=_pair, help="transfer attack, e.g. 1000x2")
    p.add_argument("--eps-sweep", type=_numbers(float), help="test radii of the Fig 4 sweep [x/255]")
    p.add_argument("--sweep-attack", type=_pair, help="PGD of the eps sweep, e.g. 100x1")
    p.add_argument("--steps-sweep", type=_numbers(int, least=1),
                   help="PGD iteration counts of Fig 9")
    p.add_argument("--targeted", choices=("none", "random"), default="none",
                   help="random: the white-box PGD rows are random-targeted (ImageNet protocol, "
                        "Xie et al.); the other parts stay untargeted")
    p.add_argument("--n-examples", type=int, help="evaluate a subset of the test set, drawn with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, targets and attack starts")
    p.add_argument("--batch-size", type=int, default=500, help="images per batch (not AutoAttack's)")
    p.add_argument("--autoattack-batch-size", type=int, default=AUTOATTACK_BATCH,
                   help="images per batch of the autoattack and apgd parts (default "
                        f"{AUTOATTACK_BATCH}, the reference's: its result image by image; the "
                        "result depends on it through the random starts)")
    p.add_argument("--checkpoint", choices=tuple(CHECKPOINTS), default="last",
                   help="last (the paper's protocol) or best: the epoch with the best PGD accuracy "
                        "on the held-out images of a run trained with --val-size")
    p.add_argument("--name", help="stem of the output files (default: eval, eval_best for "
                   "--checkpoint best)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores idle at the start)")
    p.add_argument("--data-root", help="where CIFAR is read from (default: the run's)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None)
    return p




def shorten(cfg: iaat.Config, epochs: Optional[int]) -> iaat.Config:
    """The same run in `epochs` epochs with its LR milestones scaled; None: as it is."""
    if not epochs:
        return cfg
    milestones = tuple(round(m * epochs / cfg.epochs) for m in cfg.lr_milestones)
    return iaat.check_config(dataclasses.replace(cfg, epochs=epochs, lr_milestones=milestones))


def command_line(cfg: iaat.Config, script: str = "iaat.py") -> str:
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
        assert not failed, f"this finding does not hold: {failed[0]}"
        print("all findings hold")
    else:
        for claim, holds in claims.items():
            print(f"{'holds' if holds else 'does NOT hold'}: {claim}")


def train_or_load(cfg: iaat.Config, log: Optional[Callable[[str], None]] = None,
                  train_missing: bool = True) -> dict:
    """The summary of run_dir(cfg): from its summary.json if that run finished with these
    settings, else train (or resume) it, or with train_missing=False raise IAATError.
    Notebooks use it to render runs made elsewhere (say, CIFAR on a GPU)."""
    out = iaat.run_dir(cfg)
    if (out / "summary.json").is_file() and (out / "config.json").is_file():
        done = json.loads((out / "summary.json").read_text())
        saved = json.loads((out / "config.json").read_text())
        if done.get("epochs") == cfg.epochs and iaat.changed_setting(cfg, saved) is None:
            return done
    if not train_missing:
        raise IAATError(f"no finished run with these settings in {out}; train it first")
    return iaat.train(cfg, log or (lambda msg: None))


def main(argv=None) -> int:
    """`iaat eval RUN_DIR [flags]`: the flags in the CLI's units (/255), then evaluate_run."""
    args = vars(build_eval_parser().parse_args(sys.argv[1:] if argv is None else argv))
    for key in ("eps", "step_size"):
        if args[key] is not None:
            args[key] /= PIXEL
    if args["eps_sweep"] is not None:
        args["eps_sweep"] = tuple(e / PIXEL for e in args["eps_sweep"])
    threads = args.pop("threads")
    try:
        if threads is not None and threads < 1:
            raise IAATError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(iaat_run.choose_threads(threads)[0])
        evaluate_run(args.pop("run"), **args)
    except (IAATError, OSError) as err:
        print(f"iaat: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("iaat: interrupted; the parts finished so far are in the JSON", file=sys.stderr)
        return 130
    return 0


# ============================================================================================
# Plots of a training run: loss and accuracies, the eps memory (paper Figs 5 and 7)
# ============================================================================================

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
    _save_figure(fig, out / "curves.png")

    h = history * PIXEL
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    picks = sorted({int(round(i)) for i in np.linspace(0, len(h) - 1, min(len(h), 5))})
    bins = np.linspace(0, max(h.max(), 1e-6), 40)
    for i in picks:
        ax.hist(h[i], bins=bins, histtype="step", label=f"after epoch {i + 1}")
    ax.set(xlabel="eps_i (x/255)", ylabel="training samples", title="eps memory (paper Fig 5)")
    ax.legend()
    _save_figure(fig, out / "eps_hist.png")

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
    _save_figure(fig, out / "eps_mean.png")


def _save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))



if __name__ == "__main__":
    sys.exit(main())
