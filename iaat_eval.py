"""The paper's evaluation protocol (Sec 4, Tables 1-4, Figs 4 and 9) on runs trained by iaat.py.

    python iaat.py eval runs/digits-smallcnn-iaat-seed0               # or: iaat eval RUN
    python iaat.py eval RUN --surrogate RUN_SEED1 --corruptions CIFAR-10-C/   # all columns

or from Python, with keyword arguments in pixel units ([0,1]):

    import iaat_eval
    res = iaat_eval.evaluate_run("runs/digits-smallcnn-iaat-seed0", parts={"whitebox"},
                                 n_examples=200)

White-box PGD (10x5, 100x5, 1000x2; each sample's worst case over restarts), transfer from an
independently trained surrogate, CIFAR-10-C corruptions (and ImageNet-C mCE), DeepFool,
MI-FGSM and CW40 (from torchattacks), standard AutoAttack (iaat_autoattack: the reference
implementation, pyautoattack), the test-eps sweep (Fig 4) and the PGD-steps sweep (Fig 9).
Every robust accuracy counts an image only if it is classified correctly clean and under the
attack. Always FP32, model in eval mode. The tables, sanity flags and sweep plots of the
results are iaat_report's. Imports run one way: iaat_run <- iaat <- iaat_autoattack,
iaat_report <- this module; iaat.py imports it only inside main, for `iaat eval`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from iaat import (PIXEL, Config, Step, ball, build_model, clean_correct, input_grad, load_data,
                  model_mode, per_sample, pgd_attack, pgd_fooled, step_per_sample, to_float,
                  uniform_start, loss_name)
from iaat_autoattack import (AUTOATTACK_BATCH, AUTOATTACK_PARTS, AUTOATTACK_STAGES,
                             autoattack_correct)
from iaat_report import (eval_table, flag_notes, model_info, pgd_name, plot_sweeps, sanity_flags,
                         stage_notes, sweep_tables)
from iaat_run import (CLIParser, IAATError, atomic_write, choose_threads, numbers, parse_pair,
                      parse_pairs, pick_device, read_checkpoint, write_json)


# ============================================================================================
# Attacks and accuracies: white-box PGD, the steps sweep, transfer, Table 3's attacks
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
# Corruptions: accuracy on CIFAR-10-C's files, and ImageNet-C's mCE
# ============================================================================================

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


# ============================================================================================
# The protocol's settings, and the run folders it reads
# ============================================================================================

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
WEIGHTS = ("raw", "ema")  # ema: the weight average of a run trained with --ema


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


def load_model(run: Path, device, cfg: Config, ckpt: dict, weights: str = "raw") -> nn.Module:
    """The run's trained model, in eval mode; its normalisation comes from the checkpoint.
    `weights`: raw (the trained weights) or ema (the average a run trained with --ema kept)."""
    if cfg.dataset not in DATASET_SHAPES:
        raise IAATError(f"{run}: unknown dataset {cfg.dataset!r} in the checkpoint")
    if weights not in WEIGHTS:
        raise IAATError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    if weights == "ema" and "ema" not in ckpt:
        raise IAATError(f"{run} kept no weight average: train with --ema DECAY, or evaluate "
                        "--weights raw")
    channels, classes = DATASET_SHAPES[cfg.dataset]
    model = build_model(cfg.model, classes, (0.0,) * channels, (1.0,) * channels)
    try:
        model.load_state_dict(ckpt["model" if weights == "raw" else "ema"])
    except RuntimeError as err:
        raise IAATError(f"the checkpoint in {run} does not fit model {cfg.model}: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval()


def load_run(run, device="cpu", data_root: Optional[str] = None,
             checkpoint: str = "last", weights: str = "raw") -> tuple:
    """(model in eval mode, Config, Data, checkpoint epoch) of a run folder, in one call; CIFAR
    is read from `data_root` (default: where the run read it); `checkpoint`: last or best;
    `weights`: raw or ema (the weight average of --ema)."""
    run, device = Path(run), torch.device(device)
    cfg, ckpt = run_config(run, checkpoint)
    data_cfg = dataclasses.replace(cfg, data_root=data_root) if data_root else cfg
    return (load_model(run, device, cfg, ckpt, weights), cfg, load_data(data_cfg, device),
            ckpt["epoch"])


def test_subset(n: int, n_examples: Optional[int], seed: int, device) -> torch.Tensor:
    """The test indices evaluated: all, or `n_examples` of them drawn with `seed` (sorted)."""
    if n_examples is None or n_examples >= n:
        return torch.arange(n, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:n_examples].sort().values.to(device)


# ============================================================================================
# The protocol: every part on one set of test images
# ============================================================================================

def _batched(fn, x_u8, y, batch_size: int, desc: str) -> torch.Tensor:
    """fn(x, y, idx) -> bool (..., B) over batches of the examples (idx: their positions),
    concatenated; with a progress bar on a terminal."""
    from tqdm import tqdm  # the plain bar: silent outside a terminal, notebooks included
    batches = torch.arange(len(y), device=y.device).split(batch_size)
    return torch.cat([fn(to_float(x_u8[i]), y[i], i)
                      for i in tqdm(batches, desc=desc, leave=False, disable=None)], dim=-1)


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
            ok = timed(pgd_name(k, r), lambda: batched(
                lambda x, t, i: attack_correct(model, x, t, eps=eps, steps=k, step_size=step,
                                               restarts=r, target=None if target is None
                                               else target[i]), pgd_name(k, r)))
            res["whitebox"][pgd_name(k, r)], worst = ok.float().mean().item(), worst & ok
    if "transfer" in parts:
        k, r = ev["transfer"]
        ok = timed("transfer", lambda: batched(lambda x, t, _: transfer_correct(
            model, surrogate, x, t, eps=eps, steps=k, step_size=step, restarts=r),
            f"transfer {pgd_name(k, r)}"))
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
        res["eps_sweep"] = {"attack": pgd_name(k, r), "eps_255": [e * PIXEL for e in ev["eps_sweep"]],
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
                 checkpoint: str = "last", weights: Optional[str] = None, device: str = "auto",
                 data_root: Optional[str] = None, download: Optional[bool] = None,
                 **settings) -> dict:
    """The evaluation of a run folder, as `iaat eval RUN`: load its last checkpoint (or with
    checkpoint="best", --val-size's best on the held-out images), its `weights` (raw, or ema:
    the weight average of --ema; default ema where the run kept one), run every part
    (eval_settings: parts, eps, step_size, whitebox, transfer, eps_sweep, sweep_attack,
    steps_sweep, targeted, n_examples, seed, batch_size, autoattack_batch_size, preset; radii
    in [0,1]), print the table and write <run>/<name>.json (default name: eval, or eval_best;
    rewritten after every part, with "complete": false until the end; _ema added for the
    weight average), .md, the sweep plots
    and, with the autoattack part, RobustBench's <name>_model_info.json. Returns the results."""
    run = Path(run)
    surrogate = Path(surrogate) if surrogate is not None else None
    corruptions = Path(corruptions) if corruptions is not None else None
    cfg, ckpt = run_config(run, checkpoint)
    weights = weights or ("ema" if "ema" in ckpt else "raw")
    name = name or ("eval" if checkpoint == "last" else "eval_best") + \
        ("_ema" if weights == "ema" else "")
    ev = eval_settings(cfg.dataset, surrogate=surrogate, corruptions=corruptions, **settings)
    if surrogate is not None and surrogate.resolve() == run.resolve():
        raise IAATError("--surrogate must be another run (an independently trained copy)")
    device = pick_device(device)
    model = load_model(run, device, cfg, ckpt, weights)
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
    loss = loss_name(cfg)
    tags = ("-trades" if cfg.method == "iaat" and loss == "trades" else "") + \
        (" (weight average)" if weights == "ema" else "")
    head = {"label": f"{cfg.dataset} {cfg.model} {cfg.method}{tags} seed {cfg.seed}{which}",
            "run": str(run), "checkpoint": checkpoint, "checkpoint_epoch": ckpt["epoch"],
            "epochs": cfg.epochs, "dataset": cfg.dataset, "model": cfg.model,
            "method": cfg.method, "loss": loss, "weights": weights, "seed": cfg.seed,
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
            f"{cfg.epochs}{', weight average' if weights == 'ema' else ''}) at eps "
            f"{ev['eps'] * PIXEL:g}/255, step "
            f"{ev['step_size'] * PIXEL:g}/255, {len(idx)} test images, seed {ev['seed']}"
            f"{', random-targeted white-box PGD' if target is not None else ''} (accuracy, %):\n\n"
            + eval_table([res]) + "\n\n" + "\n\n".join(filter(None, (
                stage_notes(res), flag_notes(res)))) + "\n" + sweep_tables(res) + "\n")
    print(text)
    write_json(json_path, res)
    info = run / f"{name}_model_info.json"  # RobustBench's format (docs/robustbench.md)
    if "autoattack" in res:
        write_json(info, model_info(res))
    else:  # none left from an earlier evaluation under this name
        info.unlink(missing_ok=True)
    atomic_write(run / f"{name}.md", lambda p: p.write_text(text))
    plot_sweeps(res, run, name)
    return res


# ============================================================================================
# The CLI: `iaat eval RUN_DIR [flags]` (also `python iaat.py eval ...`)
# ============================================================================================

def build_eval_parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="iaat eval", description="The paper's evaluation protocol (Sec 4, Tables 1-4, "
                "Figs 4 and 9) on a run folder written by iaat.py; writes <run>/<name>.json, "
                ".md and sweep plots. Always FP32, model in eval mode.",
                epilog="presets:\n" + "\n".join(
                    f"  {k}: eps {v['eps'] * PIXEL:g}/255, step {v['step_size'] * PIXEL:g}/255, "
                    f"whitebox {','.join(pgd_name(*w) for w in v['whitebox'])}, transfer "
                    f"{pgd_name(*v['transfer'])}" for k, v in EVAL_PRESETS.items()),
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
    p.add_argument("--eps", type=numbers(float, single=True), help="test radius [x/255]")
    p.add_argument("--step-size", type=numbers(float, single=True),
                   help="PGD step size [x/255]")
    p.add_argument("--whitebox", type=parse_pairs, help="white-box PGD attacks, e.g. 10x5,100x5,1000x2")
    p.add_argument("--transfer", type=parse_pair, help="transfer attack, e.g. 1000x2")
    p.add_argument("--eps-sweep", type=numbers(float), help="test radii of the Fig 4 sweep [x/255]")
    p.add_argument("--sweep-attack", type=parse_pair, help="PGD of the eps sweep, e.g. 100x1")
    p.add_argument("--steps-sweep", type=numbers(int, least=1),
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
    p.add_argument("--weights", choices=WEIGHTS, help="raw: the trained weights; ema: the "
                   "weight average of a run trained with --ema (default: ema where the run kept "
                   "one, else raw)")
    p.add_argument("--name", help="stem of the output files (default: eval, eval_best for "
                   "--checkpoint best; then _ema for the weight average)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores idle at the start)")
    p.add_argument("--data-root", help="where CIFAR is read from (default: the run's)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None)
    return p


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
        torch.set_num_threads(choose_threads(threads)[0])
        evaluate_run(args.pop("run"), **args)
    except (IAATError, OSError) as err:
        print(f"iaat: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("iaat: interrupted; the parts finished so far are in the JSON", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
