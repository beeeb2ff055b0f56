"""AutoAttack (Croce & Hein, ICML 2020), standard version, from the reference implementation
(fra31/auto-attack, packaged on PyPI as pyautoattack), driven stage by stage so that each
image's result after each stage is kept, as the reference reports its robust accuracy.

    rows = iaat_autoattack.autoattack_correct(model, x_u8, y, eps=8 / 255)  # (4, B) bool

`iaat eval RUN --parts autoattack` runs it (iaat_eval); `--parts apgd` its first two stages.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn

from iaat import PIXEL, model_mode, to_float
from iaat_run import IAATError

# The stages of standard AutoAttack in the order it runs them (reference name -> title), and
# the parts of `iaat eval` that run them: `apgd` is the cheap quick look (its first two).
AUTOATTACK_STAGES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T",
                     "square": "Square"}
AUTOATTACK_PARTS = {"autoattack": tuple(AUTOATTACK_STAGES), "apgd": ("apgd-ce", "apgd-t")}
# The batch of the reference's run_standard_evaluation (its `batch_size`). The result depends on it
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
    reference's run_standard_evaluation(x, y, batch_size=batch_size), image by image; the default is
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
