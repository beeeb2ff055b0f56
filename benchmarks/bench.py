"""Speed benchmark of iaat.py: three ratios, measured in one run on one model, batch and setting
(docs/design.md, Speed: the cost of IAAT over PGD-AT is reported as a ratio measured in one run).

  1. PGD-10 attack:  iaat.pgd_attack / torchattacks.PGD, same model (eval mode), same batch.
                     Target <= 1.05.
  2. IAAT epoch / PGD-AT epoch, from one warmed-up state, with Algorithm 2 running.
                     Target <= 2.0. The fraction of samples fooled at prev + gamma (the size of
                     Algorithm 2's second attack) is printed with it: it explains the ratio.
  3. iaat.train_step (IAAT) / official_style_step, the per-batch work of the official trainer
                     (yogeshbalaji/Instance_Adaptive_Adversarial_Training), same batches, same
                     state. Target <= 1.0 (ours is never the slower one).

Usage, from the repository root:

    python benchmarks/bench.py                     # CPU default: digits, smallcnn, fp32 (~1.5 min)
    python benchmarks/bench.py --amp bf16
    python benchmarks/bench.py --quick --json /tmp/bench.json            # smoke test, ~10 s
    python benchmarks/bench.py --device cuda --data synthetic --model resnet18 --amp bf16 \\
        --peak-tflops 989                        # GPU: CIFAR-shaped random data
    python benchmarks/bench.py --device cuda --data synthetic --model wrn32-10 --n-images 2560

Results: a markdown table on stdout and JSON in benchmarks/results/<device>-<model>-<amp>.json
(--json PATH to choose). Timing: warm-up calls first; CUDA is synchronised around every timer;
the contenders are interleaved (A B C, B C A, ...) from the same torch seed, and each figure is
the median of the per-repeat ratios, because a shared machine is noisy.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/bench.py` imports the iaat.py next to it
import iaat  # noqa: E402
import iaat_run  # noqa: E402

TARGETS = {"pgd": 1.05, "iaat_over_at": 2.0, "ours_over_official": 1.0}
# PreAct ResNet-18 on a 32x32 image: 0.56 G multiply-accumulates per forward. A PGD-10 AT step
# costs about 23 forward-equivalents per image (10 x (forward + input backward) + forward and
# full backward of the training step).
RESNET18_MACS, AT_FORWARDS = 0.56e9, 23


# ============================================================================================
# Command line
# ============================================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        self.exit(2, f"bench: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available [default: auto]")
    p.add_argument("--model", default="smallcnn", choices=iaat.CHOICES["model"], help="[default: smallcnn]")
    p.add_argument("--data", default="digits", choices=("digits", "synthetic"),
                   help="digits: the embedded data, the digits preset and a real warm-up of "
                        "cfg.warmup PGD-AT epochs; synthetic: random CIFAR-shaped images and "
                        "labels, the CIFAR preset, --warm-steps of PGD-AT [default: digits]")
    p.add_argument("--batch", type=int, help="batch size [default: the preset's, 64 digits, "
                                             "128 CIFAR]")
    p.add_argument("--n-images", type=int, help="synthetic images per epoch [default: 5120]")
    p.add_argument("--warm-steps", type=int, help="PGD-AT steps of the synthetic warm-up "
                                                  "[default: 50]")
    p.add_argument("--amp", default="none", choices=tuple(iaat.AMP), help="[default: none]")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="[default: auto, on for CUDA with --amp]")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--repeats", type=int, help="timed repeats of each contender [default: 9, "
                                               "quick 2]")
    p.add_argument("--pgd-repeats", type=int, help="timed repeats of figure 1, whose calls are "
                                                   "short and so noisier [default: 30, quick 2]")
    p.add_argument("--pgd-calls", type=int, help="attack calls per timed repeat of figure 1 "
                                                 "[default: 5, quick 1]")
    p.add_argument("--threads", type=int, help="torch CPU threads [default: 1 on CPU, where "
                   "small models gain little from more and a shared machine makes several "
                   "threads wait on each other; torch's own on CUDA]")
    p.add_argument("--seed", type=int, default=0, help="[default: 0]")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense TFLOP/s at this "
                                                     "precision, for the model-FLOP utilisation")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the smoke test (~10 s)")
    p.add_argument("--json", help="where to write the results [default: "
                                  "benchmarks/results/<device>-<model>-<amp>.json]")
    return p


def parse_args(argv) -> argparse.Namespace:
    """Flags with the quick/default sizes filled in; bad values raise IAATError."""
    args = build_parser().parse_args(argv)
    quick = args.quick
    if args.data == "digits" and (args.n_images is not None or args.warm_steps is not None):
        raise iaat_run.IAATError("--n-images and --warm-steps are for --data synthetic (digits "
                                 "trains on its own images, warmed up for the preset's epochs)")
    defaults = dict(repeats=2 if quick else 9, pgd_repeats=2 if quick else 30,
                    pgd_calls=1 if quick else 5,
                    n_images=128 if quick else 5120, warm_steps=2 if quick else 50)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "n_images", "repeats", "pgd_repeats", "pgd_calls", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise iaat_run.IAATError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warm_steps < 0:
        raise iaat_run.IAATError(f"--warm-steps must be >= 0, got {args.warm_steps}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise iaat_run.IAATError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return args


# ============================================================================================
# Set-up: model, optimiser, eps memory and data, warmed up with real PGD-AT
# ============================================================================================

@dataclass
class Bench:
    """Everything the contenders share. `s` is iaat's training state: s.compiled is what the
    steps call (channels_last/compile), s.model holds the weights that the snapshots save and
    restore, s.mem the eps memory."""
    cfg: iaat.Config  # method "iaat"; the PGD-AT contender uses a copy with method "at"
    device: torch.device
    data: iaat.Data
    s: iaat.TrainState
    layout: torch.memory_format

    def step(self, x, y, idx, epoch: int, cfg: iaat.Config) -> dict:
        """iaat.train_step at `epoch` with `cfg` (the IAAT or the PGD-AT contender)."""
        self.s.epoch = epoch
        return iaat.train_step(self.s, x, y, idx, cfg)


def make_config(args) -> iaat.Config:
    """The digits preset, or the CIFAR preset of --model for synthetic data, plus the flags."""
    common = dict(model=args.model, batch_size=args.batch, amp=args.amp, seed=args.seed,
                  channels_last=args.channels_last, compile=args.compile, method="iaat")
    if args.data == "digits":
        cfg = iaat.make_config("digits", **common)
        return iaat.make_config("digits", **common, warmup=1) if args.quick else cfg
    return iaat.make_config("cifar10", **common)


def synthetic_data(n: int, seed: int) -> iaat.Data:
    """n random uint8 3x32x32 images with random labels of 10 classes (CIFAR's shapes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    pixels = iaat.to_float(x).transpose(0, 1).flatten(1)
    return iaat.Data(x, y, x[:0], y[:0], 10, tuple(pixels.mean(1).tolist()),
                     tuple(pixels.std(1).tolist()), "cifar")


def load_data(args) -> iaat.Data:
    if args.data == "synthetic":
        return synthetic_data(args.n_images, args.seed)
    data = iaat.load_digits()
    if args.quick:  # two batches of 64
        data = dataclasses.replace(data, train_x=data.train_x[:128], train_y=data.train_y[:128])
    return data


def set_up(args) -> Bench:
    device = iaat_run.pick_device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    cfg = make_config(args)
    data = load_data(args).to(device)
    torch.manual_seed(cfg.seed)
    model = iaat.build_model(cfg.model, data.num_classes, data.mean, data.std).to(device)
    s = iaat.make_state(model, cfg, len(data.train_y))  # Alg 1: mem = eps_w
    layout = torch.channels_last if iaat.uses_channels_last(cfg, device) else torch.contiguous_format
    return Bench(cfg, device, data, s, layout)


def make_scaler(cfg: iaat.Config, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")


def epoch_batches(b: Bench, epoch: int) -> list:
    """(x, y, idx) of every batch of one epoch, augmented as iaat.train does (its generator)."""
    gen = iaat.epoch_generator(b.cfg.seed, epoch, b.device)
    n = len(b.data.train_y)
    out = []
    for idx in torch.randperm(n, generator=gen, device=b.device).split(b.cfg.batch_size):
        x = iaat.augment(b.data.train_x[idx], b.data.augmentation, gen)
        out.append((x.contiguous(memory_format=b.layout), b.data.train_y[idx], idx))
    return out


def warm_up(b: Bench, args, log) -> str:
    """Real PGD-AT at eps_w with iaat.train_step: cfg.warmup epochs of digits, or --warm-steps
    steps of synthetic data. Returns what was done, in words."""
    at = dataclasses.replace(b.cfg, method="at")
    t0 = time.perf_counter()
    if args.data == "digits":
        for epoch in range(b.cfg.warmup):
            for x, y, idx in epoch_batches(b, epoch):
                b.step(x, y, idx, epoch, at)
            b.s.sched.step()
        done = f"{b.cfg.warmup} epoch(s) of PGD-AT at eps_w (the preset's warm-up)"
    else:
        batches, passes = [], 0
        for _ in range(args.warm_steps):
            if not batches:
                batches, passes = epoch_batches(b, passes), passes + 1
            x, y, idx = batches.pop(0)
            b.step(x, y, idx, 0, at)
        done = f"{args.warm_steps} steps of PGD-AT at eps_w"
    sync(b.device)
    log(f"warm-up: {done}, {time.perf_counter() - t0:.1f} s")
    return done


def snapshot(b: Bench) -> dict:
    """The warmed-up state every contender starts from: weights, optimiser, eps memory, scaler."""
    return copy.deepcopy({"model": b.s.model.state_dict(), "opt": b.s.opt.state_dict(),
                          "mem": b.s.mem, "scaler": b.s.scaler.state_dict()})


def restore(b: Bench, state: dict) -> None:
    """Back to `state`, in place (a compiled `net` keeps its compiled code), from fresh copies."""
    state = copy.deepcopy(state)
    b.s.model.load_state_dict(state["model"])
    b.s.opt.load_state_dict(state["opt"])
    b.s.mem.copy_(state["mem"])
    b.s.scaler = make_scaler(b.cfg, b.device)
    if b.s.scaler.is_enabled():
        b.s.scaler.load_state_dict(state["scaler"])


# ============================================================================================
# Reference: the per-batch work of the official trainer (figure 3)
# ============================================================================================

def official_pgd(model, x, y, eps, steps: int, min_step: float) -> torch.Tensor:
    """REFERENCE, not used for training: PGD as the official attacker computes it.

    The input gradient comes from `loss.backward()` on the whole graph, so every parameter's
    .grad is computed (and accumulated) too: work that iaat's attacks skip by asking
    torch.autograd.grad for the input only. Model mode is left as the caller set it (the
    official trainer keeps it in train mode). The step is the official rule,
    max(eps / (steps / 2), min_step) per sample; the random start is not clamped to [0,1].
    """
    eps = eps.view(-1, 1, 1, 1).to(x.dtype)
    step = torch.clamp(eps / (0.5 * steps), min=min_step)
    x_adv = x + (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv).float(), y)
        loss.backward()  # fills x_adv.grad and every parameter's .grad
        x_adv = x_adv.detach() + step * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def official_style_step(model, opt, x, y, idx, mem, cfg: iaat.Config, scaler=None) -> dict:
    """REFERENCE, not used for training: one IAAT step (after warm-up) doing the work that
    the official trainer (trainers/trainer_adaptive.py) does per batch, written from its
    description, in train mode throughout:

      a clean no_grad forward (which samples are correct);
      PGD-k on the whole batch at eps_prev and at eps_prev + gamma (official_pgd: parameter
      gradients computed by loss.backward() each step);
      two no_grad forwards on those results (which attacks kept the label);
      eps = that of Alg 2, times the clean-correct mask, clipped at 0, averaged with beta;
      PGD-k on the whole batch at eps (parameter gradients again), then zero the gradients;
      the training forward, backward and SGD step.

    Versus iaat.train_step: no early exit, the second attack is not restricted to the samples
    fooled at eps_prev + gamma, the attacks take parameter gradients, and BatchNorm is in
    train mode for the selection. Updates mem[idx] and the model; returns loss and eps.
    """
    steps, gamma, beta = cfg.attack_steps, cfg.gamma, cfg.beta
    with iaat.autocast(cfg, x.device):
        model.train()
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        prev = mem[idx]
        x_prev = official_pgd(model, x, y, prev, steps, cfg.step_size)
        x_high = official_pgd(model, x, y, prev + gamma, steps, cfg.step_size)
        with torch.no_grad():
            kept_prev = model(x_prev).argmax(1) == y
            kept_high = model(x_high).argmax(1) == y
        chosen = torch.where(kept_high, prev + gamma, torch.where(kept_prev, prev, prev - gamma))
        eps = (1 - beta) * prev + beta * (chosen * correct).clamp(min=0)
        mem[idx] = eps
        x_adv = official_pgd(model, x, y, eps, steps, cfg.step_size)
        model.zero_grad(set_to_none=True)  # the attacks' parameter gradients are discarded
        logits = model(x_adv)
        loss = F.cross_entropy(logits.float(), y)
    iaat.optimizer_step(opt, loss, scaler or torch.amp.GradScaler(x.device.type, enabled=False))
    return {"loss": loss.detach(), "eps": eps.detach()}


# ============================================================================================
# Timing
# ============================================================================================

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of fn, with the GPU's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(contenders: dict, repeats: int, device, seed: int,
                prepare: Callable[[], None] = lambda: None) -> dict:
    """{name: [seconds per repeat]}: each repeat runs every contender once, the order rotated
    per repeat (A B C, B C A, ...); `prepare` (untimed) and torch.manual_seed(seed) come
    before each run, so every contender starts from the same state and random numbers."""
    names = list(contenders)
    times = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            prepare()
            torch.manual_seed(seed)
            times[name].append(timed(contenders[name], device))
    return times


def ratio_figure(times: dict, mine: str, theirs: str, target: float) -> dict:
    """The median of the per-repeat ratios mine/theirs, the median times, and the verdict."""
    ratios = [a / b for a, b in zip(times[mine], times[theirs])]
    ratio = statistics.median(ratios)
    return {"ratio": ratio, "target": target, "met": ratio <= target,
            "margin": target - ratio, "ratios": ratios,
            f"{mine}_s": statistics.median(times[mine]),
            f"{theirs}_s": statistics.median(times[theirs]),
            "repeats": len(ratios)}


def status(fig: dict) -> str:
    """'met, 0.02 below' or 'missed, 0.10 above' the target."""
    r, t = fig["ratio"], fig["target"]
    return f"met, {t - r:.2f} below" if fig["met"] else f"missed, {r - t:.2f} above"


def verdict(fig: dict) -> str:
    """'1.03 (target <= 1.05: met, 0.02 below)'."""
    return f"{fig['ratio']:.2f} (target <= {fig['target']:g}: {status(fig)})"


# ============================================================================================
# The three figures
# ============================================================================================

def figure_pgd(b: Bench, state: dict, args, log) -> dict:
    """Figure 1: iaat.pgd_attack vs torchattacks.PGD at 8/255, step 2/255, 10 steps, random
    start, on the warmed-up model in eval mode and the first batch of the timed epoch."""
    import torchattacks
    restore(b, state)
    x, y, _ = epoch_batches(b, b.cfg.warmup)[0]
    b.s.compiled.eval()
    theirs = torchattacks.PGD(b.s.compiled, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)

    def ours_calls():
        for _ in range(args.pgd_calls):
            iaat.pgd_attack(b.s.compiled, x, y, 8 / 255, steps=10, step_size=2 / 255,
                            grad_fn=iaat.attack_settings(b.cfg)["grad_fn"])

    def theirs_calls():
        for _ in range(args.pgd_calls):
            theirs(x, y)
    with iaat.autocast(b.cfg, b.device):
        for _ in range(1 if args.quick else 2):  # warm-up calls
            ours_calls(), theirs_calls()
        times = interleaved({"ours": ours_calls, "torchattacks": theirs_calls},
                            args.pgd_repeats, b.device, b.cfg.seed)
    log(f"figure 1 timed: {args.pgd_repeats} x {args.pgd_calls} calls each")
    fig = ratio_figure(times, "ours", "torchattacks", TARGETS["pgd"])
    fig.update(batch=len(y), calls_per_repeat=args.pgd_calls,
               ours_ms_per_call=1e3 * fig["ours_s"] / args.pgd_calls,
               torchattacks_ms_per_call=1e3 * fig["torchattacks_s"] / args.pgd_calls)
    return fig


@contextmanager
def counting_selection():
    """Count the work of Algorithm 2 inside iaat: per iaat.pgd_fooled call the samples attacked
    and fooled, and the rows that go through the input gradient (iaat.input_grad, or
    iaat_fp16.fp16_input_grad in fp16) inside and outside selection.
    (Wraps the module's functions; the counts force a sync, so only untimed runs use this.)"""
    import iaat_fp16
    stats = {"calls": [], "grad_rows": {"selection": 0, "training": 0}, "selection_s": 0.0}
    fooled_fn, grad_fn, select_fn = iaat.pgd_fooled, iaat.input_grad, iaat.select_epsilon
    fp16_fn, inside = iaat_fp16.fp16_input_grad, [0]

    def pgd_fooled(model, x, y, eps, **kw):
        inside[0] += 1
        try:
            out = fooled_fn(model, x, y, eps, **kw)
        finally:
            inside[0] -= 1
        stats["calls"].append((len(x), int(out.sum())))
        return out

    def input_grad(model, x_adv, *a, **kw):
        stats["grad_rows"]["selection" if inside[0] else "training"] += len(x_adv)
        return grad_fn(model, x_adv, *a, **kw)

    def fp16_input_grad(model, x_adv, *a, **kw):  # one input gradient, in fp16 or not
        stats["grad_rows"]["selection" if inside[0] else "training"] += len(x_adv)
        return fp16_fn(model, x_adv, *a, **kw)

    def select_epsilon(model, x, *a, **kw):
        t0 = time.perf_counter()
        out = select_fn(model, x, *a, **kw)
        sync(x.device)
        stats["selection_s"] += time.perf_counter() - t0
        return out
    iaat.pgd_fooled, iaat.input_grad, iaat.select_epsilon = pgd_fooled, input_grad, select_epsilon
    iaat_fp16.fp16_input_grad = iaat.fp16_input_grad = fp16_input_grad  # iaat imported it by name
    try:
        yield stats
    finally:
        iaat.pgd_fooled, iaat.input_grad, iaat.select_epsilon = fooled_fn, grad_fn, select_fn
        iaat_fp16.fp16_input_grad = iaat.fp16_input_grad = fp16_fn


def selection_stats(b: Bench, state: dict, batches: list) -> dict:
    """One instrumented (untimed) IAAT epoch from `state`: how much of Algorithm 2 runs."""
    restore(b, state)
    torch.manual_seed(b.cfg.seed)
    n = up_fooled = second_n = second_fooled = 0
    t0 = time.perf_counter()
    with counting_selection() as stats:
        for x, y, idx in batches:
            first = len(stats["calls"])
            b.step(x, y, idx, b.cfg.warmup, b.cfg)
            calls = stats["calls"][first:]  # prev + gamma on the batch, then prev on the subset
            n, up_fooled = n + calls[0][0], up_fooled + calls[0][1]
            if len(calls) > 1:
                second_n, second_fooled = second_n + calls[1][0], second_fooled + calls[1][1]
    sync(b.device)
    total_s = time.perf_counter() - t0
    steps = b.cfg.attack_steps
    return {
        "fooled_at_prev_plus_gamma": up_fooled / n,
        "second_attack_subset_fraction": second_n / n,
        "second_attack_subset_mean_per_batch": second_n / len(batches),
        "fooled_at_prev_in_subset": second_fooled / max(second_n, 1),
        "chosen": {"up": 1 - up_fooled / n, "keep": (second_n - second_fooled) / n,
                   "down": second_fooled / n},
        "input_grad_rows_per_image": {
            "selection": stats["grad_rows"]["selection"] / n,
            "training_attack": stats["grad_rows"]["training"] / n,
            "pgd_at_attack": steps, "plain_alg2_selection": 2 * steps},
        "selection_share_of_epoch": stats["selection_s"] / total_s,
        "eps_mean_after": float(b.s.mem.mean()),
    }


def figure_epochs(b: Bench, state: dict, args, log) -> tuple:
    """Figures 2 and 3: one epoch of IAAT (iaat.train_step, Alg 2 running), of PGD-AT, and of
    official_style_step, each from `state`, interleaved. Returns (fig2, fig3, epochs, stats)."""
    cfg, at = b.cfg, dataclasses.replace(b.cfg, method="at")
    epoch, batches = cfg.warmup, epoch_batches(b, cfg.warmup)

    steps = {
        "iaat": lambda x, y, idx: b.step(x, y, idx, epoch, cfg),
        "pgd_at": lambda x, y, idx: b.step(x, y, idx, epoch, at),
        "official": lambda x, y, idx: official_style_step(b.s.compiled, b.s.opt, x, y, idx,
                                                          b.s.mem, cfg, b.s.scaler),
    }
    for step in steps.values():  # warm-up calls: two batches each (quick: one)
        restore(b, state)
        torch.manual_seed(cfg.seed)
        for x, y, idx in batches[:1 if args.quick else 2]:
            step(x, y, idx)
    contenders = {name: (lambda step=step: [step(*batch) for batch in batches])
                  for name, step in steps.items()}
    stats = selection_stats(b, state, batches)
    log(f"selection measured; timing {args.repeats} repeats of 3 epochs of {len(batches)} "
        "batches")
    times = interleaved(contenders, args.repeats, b.device, cfg.seed,
                        prepare=lambda: restore(b, state))
    n = len(b.data.train_y)
    epochs = {name: {"median_s": statistics.median(t), "images_per_s": n / statistics.median(t),
                     "seconds": t} for name, t in times.items()}
    fig2 = ratio_figure(times, "iaat", "pgd_at", TARGETS["iaat_over_at"])
    fig3 = ratio_figure(times, "iaat", "official", TARGETS["ours_over_official"])
    return fig2, fig3, epochs, stats


# ============================================================================================
# Report: hardware, markdown table, JSON
# ============================================================================================

def hardware(device: torch.device) -> dict:
    """CPU model and cores, torch threads, and the GPU where there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    hw = {"device": device.type, "cpu": cpu, "cpu_cores": os.cpu_count(),
          "cpu_cores_usable": usable, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        hw.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                  cuda=torch.version.cuda)
    return hw


def describe(hw: dict) -> str:
    what = hw["gpu"] if hw["device"] == "cuda" else hw["cpu"]
    return (f"{hw['device']} ({what}; {hw['cpu_cores_usable']} CPU cores usable, "
            f"{hw['torch_threads']} torch thread(s))")


def model_flops(b: Bench, epochs: dict, peak: float | None) -> dict | None:
    """Estimated model-FLOP utilisation of the PGD-AT epoch: PreAct ResNet-18 on 32x32 CUDA only."""
    if b.device.type != "cuda" or b.cfg.model != "resnet18" or \
            tuple(b.data.train_x.shape[2:]) != (32, 32):
        return None
    img_s = epochs["pgd_at"]["images_per_s"]
    tflops = img_s * AT_FORWARDS * RESNET18_MACS * 2 / 1e12
    return {"achieved_tflops": tflops, "peak_tflops": peak,
            "utilisation": tflops / peak if peak else None,
            "assumes": f"{RESNET18_MACS / 1e9:g} G MAC per forward, {AT_FORWARDS} "
                       "forward-equivalents per PGD-10 AT image"}


def settings(b: Bench, args, warm: str) -> dict:
    cfg = b.cfg
    return {"model": cfg.model, "data": args.data, "images_per_epoch": len(b.data.train_y),
            "image_shape": list(b.data.train_x.shape[1:]), "batch": cfg.batch_size,
            "batches_per_epoch": -(-len(b.data.train_y) // cfg.batch_size),
            "amp": cfg.amp, "channels_last": cfg.channels_last,
            "channels_last_on": iaat.uses_channels_last(cfg, b.device), "compile": cfg.compile,
            "repeats": args.repeats, "pgd_repeats": args.pgd_repeats,
            "pgd_calls_per_repeat": args.pgd_calls,
            "threads": torch.get_num_threads(), "seed": cfg.seed, "quick": args.quick,
            "warm_up": warm, "timed_epoch": cfg.warmup, "eps_w": cfg.eps_w, "gamma": cfg.gamma,
            "beta": cfg.beta, "attack_steps": cfg.attack_steps, "step_size": cfg.step_size,
            "attack_bn": cfg.attack_bn}


NAMES = {"pgd": "1. PGD-10: iaat.pgd_attack / torchattacks.PGD",
         "iaat_over_at": "2. IAAT epoch / PGD-AT epoch (Alg 2 running)",
         "ours_over_official": "3. IAAT: iaat.train_step / official_style_step"}


def markdown(res: dict) -> str:
    """The printed report: the three figures, epochs, Algorithm 2's counts, and the setting."""
    f, s, ep, sel = res["figures"], res["settings"], res["epochs"], res["selection"]
    p = f["pgd"]
    cells = {"pgd": (f"{p['ours_ms_per_call']:.1f} ms/call",
                     f"{p['torchattacks_ms_per_call']:.1f} ms/call"),
             "iaat_over_at": (f"{f['iaat_over_at']['iaat_s']:.2f} s/epoch",
                              f"{f['iaat_over_at']['pgd_at_s']:.2f} s/epoch"),
             "ours_over_official": (f"{f['ours_over_official']['iaat_s']:.2f} s/epoch",
                                    f"{f['ours_over_official']['official_s']:.2f} s/epoch")}
    lines = [f"## IAAT speed: {describe(res['hardware'])}, {s['model']} on {s['data']}, "
             f"amp {s['amp']}, batch {s['batch']}", "",
             "| figure | ratio (median) | target | verdict | ours (median) | reference (median) |",
             "|---|---|---|---|---|---|"]
    for key, fig in f.items():
        lines.append(f"| {NAMES[key]} | {fig['ratio']:.2f} | <= {fig['target']:g} | "
                     f"{status(fig)} | "
                     f"{cells[key][0]} | {cells[key][1]} |")
    lines += [""] + [f"{NAMES[key]}: {verdict(fig)}" for key, fig in f.items()]
    lines += ["", f"| epoch ({s['images_per_epoch']} images, {s['batches_per_epoch']} batches) "
              "| median s | images/s |", "|---|---|---|"]
    for key, name in (("pgd_at", "PGD-AT (iaat.train_step, method at)"),
                      ("iaat", "IAAT (iaat.train_step, method iaat)"),
                      ("official", "IAAT, official-style step")):
        lines.append(f"| {name} | {ep[key]['median_s']:.2f} | {ep[key]['images_per_s']:.0f} |")
    rows = sel["input_grad_rows_per_image"]
    lines += ["", f"Algorithm 2 (one instrumented IAAT epoch): "
              f"{100 * sel['fooled_at_prev_plus_gamma']:.1f}% of samples fooled at prev + gamma, "
              f"so the second attack runs on {sel['second_attack_subset_mean_per_batch']:.1f} "
              f"of {s['batch']} samples per batch; {100 * sel['fooled_at_prev_in_subset']:.1f}% "
              f"of those are fooled at prev too. Chosen: up {100 * sel['chosen']['up']:.1f}%, "
              f"keep {100 * sel['chosen']['keep']:.1f}%, down {100 * sel['chosen']['down']:.1f}%.",
              f"Input-gradient rows per image: selection {rows['selection']:.1f} (plain Alg 2 "
              f"without subset and early exit: {rows['plain_alg2_selection']}), training attack "
              f"{rows['training_attack']:.1f}, PGD-AT's attack {rows['pgd_at_attack']}. "
              f"Selection took {100 * sel['selection_share_of_epoch']:.0f}% of that epoch."]
    if res.get("mfu"):
        m = res["mfu"]
        peak = (f" = {100 * m['utilisation']:.1f}% of the {m['peak_tflops']:g} TFLOP/s peak"
                if m["peak_tflops"] else " (give --peak-tflops for the utilisation)")
        lines.append(f"Model FLOP utilisation, PGD-AT epoch: {m['achieved_tflops']:.1f} TFLOP/s"
                     f"{peak} ({m['assumes']}).")
    lines += [""] + [f"Note: {n}" for n in res["notes"]]
    lines += ["", f"hardware: {json.dumps(res['hardware'])}", f"torch {res['torch']}, "
              f"torchattacks {res['torchattacks']}, python {res['python']}",
              f"command: {res['command']}", f"settings: {json.dumps(s)}"]
    return "\n".join(lines)


def notes(args, b: Bench) -> list:
    out = []
    if args.data == "synthetic":
        out.append("synthetic data (random images and labels): a model warmed up on it has "
                   "fooled fractions, and so a selection cost, that are not those of real "
                   "training; figure 2 is a speed check, not the real IAAT/AT ratio.")
    if args.quick:
        out.append("--quick: tiny sizes for the smoke test; the figures mean nothing.")
    if b.device.type == "cpu":
        out.append("CPU: a small model's timings move by several percent between runs of the "
                   "same command on a shared machine (other processes, where the process "
                   "lands), more than within a run; GPU ratios can differ.")
    return out


def default_json(args, device: torch.device) -> Path:
    name = f"{device.type}-{args.model}-{args.amp}{'-quick' if args.quick else ''}.json"
    return ROOT / "benchmarks" / "results" / name


# ============================================================================================
# Main
# ============================================================================================

def run(args, argv: list, log=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)):
    """Set up, warm up, measure the three figures; print the report and write the JSON."""
    import torchattacks
    t0 = time.perf_counter()
    b = set_up(args)
    warm = warm_up(b, args, log)
    state = snapshot(b)
    pgd = figure_pgd(b, state, args, log)
    fig2, fig3, epochs, sel = figure_epochs(b, state, args, log)
    res = {"command": shlex.join(["python", sys.argv[0], *argv]), "argv": argv,
           "hardware": hardware(b.device), "torch": torch.__version__,
           "torchattacks": torchattacks.__version__, "python": platform.python_version(),
           "settings": settings(b, args, warm),
           "figures": {"pgd": pgd, "iaat_over_at": fig2, "ours_over_official": fig3},
           "epochs": epochs, "selection": sel, "mfu": model_flops(b, epochs, args.peak_tflops),
           "notes": notes(args, b)}
    res["wall_s"] = time.perf_counter() - t0
    print(markdown(res), flush=True)
    path = Path(args.json) if args.json else default_json(args, b.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    log(f"wrote {path} ({res['wall_s']:.0f} s in all)")
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(parse_args(argv), argv)
    except iaat_run.IAATError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
