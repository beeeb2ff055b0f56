"""Instance Adaptive Adversarial Training (IAAT), in one readable file.

Balaji, Goldstein & Hoffman, "Instance adaptive adversarial training: Improved accuracy
tradeoffs in neural nets", arXiv 1910.08051. PGD adversarial training puts one L-inf radius
around every training image; IAAT keeps a radius eps_i per image, grows it where the image
survives a larger attack and shrinks it where another class lies close by (paper Alg 1 and 2).

Run it (every flag has --help with its unit and paper source):

    pip install -r requirements.txt -e .       # set-up (CPU or GPU)
    python iaat.py                             # IAAT on the embedded digits data, CPU, 1-2 min
    python iaat.py --method at                 # Madry PGD-AT baseline at the same eps
    python iaat.py --dataset cifar10           # paper Table 10 preset: PreAct ResNet-18, 200 ep
    python iaat.py --dataset cifar100 --model wrn32-10
    torchrun --standalone --nproc_per_node=8 iaat.py --dataset cifar10   # DDP, one eps memory
    python iaat.py eval runs/digits-smallcnn-iaat-seed0   # paper Sec 4 protocol + AutoAttack
    python iaat.py --dataset cifar10 --amp bf16 --compile # bf16 autocast, compiled (DESIGN 7)
    torchrun --nproc_per_node=8 imagenet/train.py --data DIR   # ImageNet, Table 11 (its README)

Measured (README; digits preset, seeds 0-2, 2-core CPU, 30 epochs, PGD-20 at 51/255):
IAAT natural 0.984 +- 0.000, PGD 0.563 +- 0.020; PGD-AT natural 0.968 +- 0.002, PGD 0.557 +-
0.019; 53-75 s of training per IAAT run.

Rerunning a command resumes its run folder (runs/<dataset>-<model>-<method>-seed<seed>).
Use the two core functions from your own training code:

    from iaat import pgd_attack, select_epsilon
    eps_i = select_epsilon(model, x, y, mem[idx], gamma=1.9/255, beta=0.1)   # Alg 2
    x_adv = pgd_attack(model, x, y, eps_i * correct)                         # Alg 1 l.7-10

Units: images live in [0,1] and normalisation sits inside the model, so every eps, gamma and
step size in the Python API is in pixel units ([0,1]). The CLI takes the paper's 0-255 units:
`--eps-w 8` means 8/255.

Sections, in reading order: config, data, models, attacks, epsilon selection, training,
evaluation, distributed, checkpoints and outputs, the training run, the evaluation run, CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PIXEL = 255.0  # the CLI's unit: --eps-w 8 means 8/255
Step = Union[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


# ============================================================================================
# Config
# ============================================================================================

class IAATError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


def _opt(default, help: str, unit: str = ""):
    """A config field whose docstring becomes its --help text; unit='/255' is entered in 0-255."""
    return field(default=default, metadata={"help": help, "unit": unit})


@dataclass
class Config:
    """All settings of one run. Values are in pixel units ([0,1]); the CLI divides /255 units."""
    # what to train
    dataset: str = _opt("digits", "digits (embedded scikit-learn data, no download), cifar10 or cifar100")
    model: Optional[str] = _opt(None, "smallcnn, resnet18 (PreAct ResNet-18) or wrn32-10 "
                                      "(Madry's WideResNet: 5 blocks/stage, width 10)")
    method: str = _opt("iaat", "iaat (paper Alg 1), at (Madry PGD-AT at the fixed radius eps_w) or clean")
    # optimisation: paper Table 10 (CIFAR ResNet-18 column unless the preset says otherwise)
    epochs: int = _opt(200, "training epochs (Table 10: 200 ResNet-18, 110 WRN-32-10)")
    batch_size: int = _opt(128, "global batch size (Table 10: 128)")
    lr: float = _opt(0.1, "SGD learning rate (Table 10: 0.1)")
    momentum: float = _opt(0.9, "SGD momentum (official code: 0.9)")
    weight_decay: float = _opt(2e-4, "weight decay (Table 10: 2e-4 ResNet-18, 5e-4 WRN-32-10)")
    lr_milestones: tuple = _opt((80, 140, 170), "epochs at which the LR decays (Table 10)")
    lr_decay: float = _opt(0.1, "LR decay factor at each milestone (Table 10: 0.1 ResNet-18, 0.2 WRN)")
    # IAAT (Alg 1 and 2, Table 10)
    eps_w: float = _opt(8 / PIXEL, "warmup radius eps_w of Alg 1, also the initial eps memory; "
                                   "the fixed radius of --method at (Table 10: 8)", "/255")
    gamma: float = _opt(1.9 / PIXEL, "discretisation gamma of Alg 2 (Table 10: 1.9)", "/255")
    beta: float = _opt(0.1, "exponential averaging factor beta of Alg 2 (Table 10: 0.1)")
    warmup: int = _opt(5, "warmup epochs at uniform eps_w before Alg 2 (Table 10: 5 ResNet-18, "
                          "10 WRN); 0 = the no-warmup ablation (Tables 5-6)")
    eps_init: Optional[float] = _opt(None, "initial eps memory (default: eps_w)", "/255")
    eps_min: float = _opt(0.0, "lower clip of the selected eps (ImageNet, Table 11: 4)", "/255")
    eps_max: Optional[float] = _opt(None, "upper clip of the selected eps (default: none)", "/255")
    line_search: bool = _opt(False, "exact line search instead of Alg 2 (paper Sec 5.2, Table 7)")
    line_eta: float = _opt(1.0 / PIXEL, "line search grid step eta (Sec 5.2)", "/255")
    line_max: float = _opt(16 / PIXEL, "line search largest radius eps_max (Sec 5.2)", "/255")
    # the PGD attack used for training and for selection (Table 10)
    attack_steps: int = _opt(10, "PGD steps k of the training and selection attacks (Table 10: 10)")
    step_size: float = _opt(2 / PIXEL, "PGD step size (Table 10: 2)", "/255")
    step_rel: Optional[float] = _opt(None, "if set, step_i = step_rel * eps_i / attack_steps instead "
                                           "of the fixed step (Madry: 2.5)")
    select_steps: Optional[int] = _opt(None, "PGD steps of Alg 2's selection attacks (default: "
                                             "--attack-steps; ImageNet, App E.2: a weaker 10)")
    select_step_size: Optional[float] = _opt(None, "PGD step of the selection attacks (default: "
                                                   "the training attack's step)", "/255")
    attack_bn: str = _opt("train", "BatchNorm mode of the training attack: train (as PGD-AT and the "
                                   "official code) or eval; selection always runs in eval mode")
    # evaluation at the end of training (the full paper protocol is `iaat eval`)
    eps_test: float = _opt(8 / PIXEL, "test radius (paper Sec 4: 8)", "/255")
    eval_steps: int = _opt(20, "PGD steps of the final robust accuracy")
    eval_step_size: float = _opt(2 / PIXEL, "PGD step size of the evaluations", "/255")
    eval_subset: int = _opt(1000, "test samples for the per-epoch PGD check (first N of the test set)")
    eval_batch: int = _opt(500, "batch size of the evaluations")
    # run
    seed: int = _opt(0, "random seed (model init, data order, augmentation, attack starts)")
    split_seed: int = _opt(0, "seed of the fixed digits train/test split")
    n_train: Optional[int] = _opt(None, "use only the first N training images (quick tries)")
    out: Optional[str] = _opt(None, "run folder (default runs/<dataset>-<model>-<method>-seed<seed>)")
    data_root: str = _opt("data", "where CIFAR is read from (and downloaded to)")
    download: bool = _opt(True, "download CIFAR when it is missing")
    device: str = _opt("auto", "auto (cuda if available), cpu or cuda")
    save_every: int = _opt(0, "also checkpoint every N training steps (0: at epoch ends only)")
    plot_every: int = _opt(10, "rewrite the plots every N epochs (always at the end)")
    # speed (DESIGN 7): amp changes the arithmetic of training; the others change no number
    # that matters (memory layout, kernel choice) and may differ between a run and its resume
    amp: str = _opt("none", "mixed precision for the training and selection attacks and the "
                            "training step: none (fp32), bf16, or fp16 (loss-scaled input "
                            "gradients, GradScaler for the weights); evaluation is always fp32")
    channels_last: str = _opt("auto", "NHWC memory layout of model and batches: auto (on for "
                                      "CUDA with --amp, where tensor cores want it), on or off")
    compile: bool = _opt(False, "torch.compile the model (the first steps compile)")
    cudnn_benchmark: bool = _opt(True, "let cuDNN time its convolution algorithms (CUDA only)")


# Paper Table 10 for CIFAR. Digits is this project's calibration (README, DESIGN 6): the
# paper's ratios gamma = step = eps_w / 4 at eps_w = 0.2, the largest radius at which PGD-AT
# still trains our small CNN (at 0.25 and 0.3 it collapses to chance; IAAT does not).
PRESETS = {
    "digits": dict(model="smallcnn", epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4,
                   lr_milestones=(20, 25), lr_decay=0.1, warmup=5, eps_w=0.2, gamma=0.05,
                   step_size=0.05, eps_test=0.2, eval_step_size=0.05, line_eta=0.05, line_max=0.4),
    "resnet18": dict(epochs=200, lr_milestones=(80, 140, 170), lr_decay=0.1, weight_decay=2e-4,
                     warmup=5),
    "wrn32-10": dict(epochs=110, lr_milestones=(70, 90, 100), lr_decay=0.2, weight_decay=5e-4,
                     warmup=10),
}
DATASETS = ("digits", "cifar10", "cifar100")
MODELS = ("smallcnn", "resnet18", "wrn32-10")
METHODS = ("iaat", "at", "clean")
# fields that may change between a run and its resumption
RUNTIME_FIELDS = {"out", "data_root", "download", "device", "save_every", "plot_every", "epochs",
                  "eval_batch", "channels_last", "compile", "cudnn_benchmark"}
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_config(dataset: str = "digits", model: Optional[str] = None, **overrides) -> Config:
    """Config for a dataset and model: dataclass defaults < paper preset < explicit overrides."""
    if dataset not in DATASETS:
        raise IAATError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    values = dict(PRESETS["digits"]) if dataset == "digits" else {"model": "resnet18"}
    if model is not None:
        values["model"] = model
    if values["model"] not in MODELS:
        raise IAATError(f"unknown model {values['model']!r}; choose from {', '.join(MODELS)}")
    values.update(PRESETS.get(values["model"], {}) if dataset != "digits" else {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = Config(dataset=dataset, **values)
    check_config(cfg)
    return cfg


def shorten(cfg: Config, epochs: Optional[int]) -> Config:
    """The same run in `epochs` epochs, its LR milestones scaled to match (quick tries and
    notebooks); None keeps the preset's schedule."""
    if not epochs:
        return cfg
    milestones = tuple(round(m * epochs / cfg.epochs) for m in cfg.lr_milestones)
    short = dataclasses.replace(cfg, epochs=epochs, lr_milestones=milestones)
    check_config(short)
    return short


def check_config(cfg: Config) -> None:
    """Reject settings that cannot be right, with a one-line reason (DESIGN section 8)."""
    if cfg.method not in METHODS:
        raise IAATError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.attack_bn not in ("train", "eval"):
        raise IAATError(f"--attack-bn must be train or eval, not {cfg.attack_bn!r}")
    if cfg.amp not in AMP or cfg.channels_last not in ("auto", "on", "off"):
        raise IAATError(f"--amp must be none, bf16 or fp16 and --channels-last auto, on or off, "
                        f"not {cfg.amp!r} and {cfg.channels_last!r}")
    for name in ("eps_w", "gamma", "eps_init", "eps_min", "eps_max", "step_size", "eps_test",
                 "select_step_size",
                 "eval_step_size", "weight_decay", "momentum", "line_eta", "line_max", "step_rel"):
        value = getattr(cfg, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise IAATError(f"--{name.replace('_', '-')} must be a finite number >= 0, got "
                            f"{_show(name, value)}")
    if not 0 < cfg.beta <= 1:
        raise IAATError(f"--beta must be in (0, 1], got {cfg.beta}")
    if cfg.eps_max is not None and cfg.eps_max < cfg.eps_min:
        raise IAATError("--eps-max must be >= --eps-min")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise IAATError(f"--lr must be a finite number > 0, got {cfg.lr}")
    for name in ("epochs", "batch_size", "attack_steps", "eval_steps", "eval_batch", "eval_subset",
                 "select_steps"):
        value = getattr(cfg, name)
        if value is not None and value < (0 if name in ("epochs", "eval_subset") else 1):
            raise IAATError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.warmup < 0 or cfg.save_every < 0 or (cfg.n_train is not None and cfg.n_train < 1):
        raise IAATError("--warmup, --save-every and --n-train must not be negative")
    if cfg.line_search and cfg.line_eta <= 0:
        raise IAATError("--line-eta must be > 0 with --line-search")


def _show(name: str, value: float) -> str:
    """A value as the user typed it: '-8/255' for /255 fields."""
    unit = Config.__dataclass_fields__[name].metadata["unit"]
    return _preset_str(name, value) + ("/255" if unit else "")


def run_dir(cfg: Config) -> Path:
    """--out, or runs/<dataset>-<model>-<method>-seed<seed>, plus one tag per setting that
    differs from the preset (e.g. -warmup0), so different commands never share a folder."""
    if cfg.out:
        return Path(cfg.out)
    preset = make_config(cfg.dataset, cfg.model, method=cfg.method, seed=cfg.seed)
    tags = [_tag(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(Config)
            if f.name not in RUNTIME_FIELDS and getattr(cfg, f.name) != getattr(preset, f.name)]
    name = f"{cfg.dataset}-{cfg.model}-{cfg.method}-seed{cfg.seed}" + "".join(f"-{t}" for t in tags)
    if len(name) > 120:  # too many overrides to spell out: a stable short hash instead
        import hashlib
        name = name[:name.index("-seed")] + f"-seed{cfg.seed}-" + \
            hashlib.sha1("".join(tags).encode()).hexdigest()[:10]
    return Path("runs") / name


def command_line(cfg: Config, script: str = "iaat.py") -> str:
    """The `python iaat.py ...` command that trains `cfg`: its dataset, method and seed, and
    every setting that differs from the preset, in the CLI's units (/255 where marked)."""
    preset = make_config(cfg.dataset, cfg.model, method=cfg.method, seed=cfg.seed)
    words = ["python", script, "--dataset", cfg.dataset, "--method", cfg.method, "--seed",
             str(cfg.seed)]
    for f in dataclasses.fields(Config):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name in ("dataset", "method", "seed") or value == getattr(preset, f.name):
            continue
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            words += [flag, *map(str, value)]
        elif value is not None:
            words += [flag, _preset_str(f.name, value)]
    return " ".join(words)


def _tag(name: str, value) -> str:
    if isinstance(value, bool):
        return name if value else f"no_{name}"
    if isinstance(value, tuple):
        return name + "_".join(map(str, value))
    return name + _preset_str(name, value) if value is not None else f"{name}None"


# ============================================================================================
# Data: whole datasets as uint8 tensors on the device, augmented in batches there
# ============================================================================================

@dataclass
class Data:
    """A dataset held as uint8 NCHW tensors; batches carry their dataset indices (eps memory)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple  # per channel, in [0,1]; used inside the model
    std: tuple
    augment: str  # "cifar" (pad-4 reflect crop + flip) or "digits" (shift <= 1 px, no flip)

    def to(self, device) -> "Data":
        move = {k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)}
        return dataclasses.replace(self, **move)


def load_digits(split_seed: int = 0, n_test: int = 497) -> Data:
    """scikit-learn's UCI handwritten digits (1797 8x8 images, 17 gray levels), fixed split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split
    d = sk_digits()
    images = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]  # (N,1,8,8), 0..255
    tr_x, te_x, tr_y, te_y = train_test_split(images, d.target, test_size=n_test,
                                              random_state=split_seed, stratify=d.target)
    return _data_from_numpy(tr_x, tr_y, te_x, te_y, 10, "digits")


def load_cifar(name: str, root: str, download: bool) -> Data:
    """CIFAR-10/100 through torchvision's own classes (download, checksum, pickle format)."""
    from torchvision import datasets
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        train, test = (cls(root, train=t, download=download) for t in (True, False))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. ..."
        hint = "" if download else " and --no-download was given"
        raise IAATError(f"{name} not found under {root!r}{hint}: {err}") from None
    except OSError as err:  # no network, read-only folder ...
        raise IAATError(f"could not download {name} to {root!r}: {err}") from None
    as_nchw = lambda ds: np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # noqa: E731
    return _data_from_numpy(as_nchw(train), train.targets, as_nchw(test), test.targets,
                            len(train.classes), "cifar")


def _data_from_numpy(tr_x, tr_y, te_x, te_y, num_classes: int, augment: str) -> Data:
    train_x = torch.as_tensor(tr_x, dtype=torch.uint8)
    pixels = train_x.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return Data(train_x, torch.as_tensor(np.asarray(tr_y), dtype=torch.long),
                torch.as_tensor(te_x, dtype=torch.uint8),
                torch.as_tensor(np.asarray(te_y), dtype=torch.long), num_classes,
                tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist()), augment)


def load_data(cfg: Config, device) -> Data:
    data = (load_digits(cfg.split_seed) if cfg.dataset == "digits"
            else load_cifar(cfg.dataset, cfg.data_root, cfg.download))
    if cfg.n_train is not None:
        data = dataclasses.replace(data, train_x=data.train_x[:cfg.n_train],
                                   train_y=data.train_y[:cfg.n_train])
    return data.to(device)


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(255)


def augment(x_u8: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Batched random crop (+ flip for CIFAR) on the device; returns floats in [0,1].

    CIFAR: reflect-pad 4, random 32x32 crop, horizontal flip (the standard recipe).
    digits: zero-pad 1, random 8x8 crop (a shift of at most one pixel); no flip, because a
    mirrored digit is another symbol.
    """
    x = to_float(x_u8)
    b, _, h, w = x.shape
    pad = 4 if kind == "cifar" else 1
    x = F.pad(x, (pad,) * 4, mode="reflect" if kind == "cifar" else "constant")
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b), generator=gen, device=x.device))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B,1,H,1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B,1,1,W)
    x = x.gather(2, rows.expand(-1, x.shape[1], -1, x.shape[3])).gather(
        3, cols.expand(-1, x.shape[1], h, -1))
    if kind == "cifar":
        flip = torch.rand(b, generator=gen, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def epoch_generator(seed: int, epoch: int, device) -> torch.Generator:
    """The data order and augmentation of one epoch depend on (seed, epoch) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


# ============================================================================================
# Models: normalisation lives inside the model, so every eps is in pixel units
# ============================================================================================

class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """A small conv net with BatchNorm for the 8x8 digits (any input size works)."""
    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        self.net = nn.Sequential(
            *block(in_ch, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.net(x)


class PreActBlock(nn.Module):
    """BN-ReLU-conv x2 with a 1x1 projection shortcut where the shape changes (He et al. 2016);
    the block of both PreAct ResNet-18 and WideResNet."""
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 (He et al. 2016), the CIFAR 'ResNet-18' of adversarial training papers."""
    def __init__(self, num_classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideResNet(nn.Module):
    """WideResNet (Zagoruyko & Komodakis) with (depth - 4) / 6 blocks per stage.

    The paper's "WideResNet-32-10" is Madry et al.'s CIFAR network: 5 blocks per stage, width
    10. Zagoruyko's depth formula counts that network as depth 34 (TRADES calls it WRN-34-10),
    so the `wrn32-10` preset builds WideResNet(depth=34, width=10).
    """
    def __init__(self, depth: int = 34, width: int = 10, num_classes: int = 10, in_ch: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(PreActBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def build_model(name: str, num_classes: int, mean, std) -> nn.Module:
    """Normalize(mean, std) followed by the named network; takes images in [0,1]."""
    in_ch = len(mean)
    nets = {"smallcnn": lambda: SmallCNN(in_ch, num_classes),
            "resnet18": lambda: PreActResNet18(num_classes, in_ch),
            "wrn32-10": lambda: WideResNet(34, 10, num_classes, in_ch)}
    if name not in nets:
        raise IAATError(f"unknown model {name!r}; choose from {', '.join(nets)}")
    return nn.Sequential(Normalize(mean, std), nets[name]())


# ============================================================================================
# Attacks: L-inf PGD with a radius and a step per sample
# ============================================================================================

@contextmanager
def model_mode(model: nn.Module, training: bool):
    """Run a block with model.train(training), then give every submodule back its own mode
    (a BatchNorm deliberately frozen in eval mode inside a training model stays frozen)."""
    was = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in was.items():
            m.training = mode


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as a (B,1,1,1) tensor broadcastable against x."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.dim() == 0:
        v = v.expand(x.shape[0])
    if v.shape != (x.shape[0],):
        raise ValueError(f"expected a float or a tensor of shape ({x.shape[0]},), got {tuple(v.shape)}")
    return v.view(-1, *([1] * (x.dim() - 1)))


def _steps_for(step_size: Step, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The per-sample step: a float, a (B,) tensor, or a rule applied to the per-sample eps."""
    return _per_sample(step_size(eps.flatten()) if callable(step_size) else step_size, x)


def _take(v, idx: torch.Tensor):
    """Restrict a per-sample argument (tensor of shape (B,)) to a subset; floats pass through."""
    return v.to(idx.device)[idx] if torch.is_tensor(v) and v.dim() > 0 else v


def _box(x, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds of the L-inf ball of radius eps around x, intersected with [0,1]: computed
    once per attack, so that each step's projection is one clamp."""
    return (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)


def _project(x_adv, lo, hi):
    """Project onto the box [lo, hi] of _box: the eps-ball around x within [0,1]."""
    return torch.clamp(x_adv, lo, hi)


def _random_start(x, eps, random_start: bool):
    """Uniform in the eps-ball, clamped to [0,1] (the official code does not clamp; DESIGN 3)."""
    if not random_start:
        return x.clone()
    return (x + (torch.rand_like(x) * 2 - 1) * eps).clamp_(0, 1)


FP16_LOSS_SCALE = 2.0 ** 12  # an fp16 input gradient's largest logit gradient, at first


def _fp16_autocast(device: torch.device) -> bool:
    """Is the caller's autocast on, in float16, for this device? (bf16 has fp32's range.)"""
    return torch.is_autocast_enabled(device.type) and \
        torch.get_autocast_dtype(device.type) == torch.float16


def _couples_samples(model: nn.Module) -> bool:
    """Does one sample's output depend on the others' (BatchNorm using batch statistics)?"""
    return any(m.training or not m.track_running_stats for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _syncs_processes(model: nn.Module) -> bool:
    """Does a train-mode SyncBatchNorm couple this process's batch with the others'?"""
    return any(isinstance(m, nn.SyncBatchNorm) and m.training for m in model.modules()) and \
        current_dist().world > 1


def _scaled_logit_grad(logits, y, targeted: bool, scale: float, per_sample: bool, synced: bool):
    """d(cross-entropy)/d(logits), computed in float64 and divided by its largest entry per
    sample (or per batch, if samples are coupled; per global batch under SyncBatchNorm), then
    times `scale`: every sample's largest logit gradient becomes `scale`, however confident
    it is (a margin of 40 gives e^-40, far below fp16's 6e-8 and near fp32's limit)."""
    with torch.no_grad():
        p = logits.double().softmax(1)
        rest = p.sum(1, keepdim=True) - p.gather(1, y[:, None])  # 1 - p_y, without cancelling
        dz = p.scatter(1, y[:, None], -rest) * (-1 if targeted else 1)
        peak = dz.abs().amax(1, keepdim=True) if per_sample else dz.abs().amax().view(1, 1)
        if synced:
            peak = peak.float()
            torch.distributed.all_reduce(peak, torch.distributed.ReduceOp.MAX)
            peak = peak.double()
        g = torch.where(peak > 0, dz / peak.clamp(min=1e-300), torch.zeros_like(dz)) * scale
        return g.to(logits.dtype)


def _all_finite(grad: torch.Tensor, synced: bool) -> bool:
    """Is the gradient finite (on every process, when SyncBatchNorm makes them retry together)?"""
    ok = torch.isfinite(grad).all().float().view(1)
    if synced:
        torch.distributed.all_reduce(ok, torch.distributed.ReduceOp.MIN)
    return bool(ok)


def _input_grad(model, x_adv, y, targeted: bool, scale: float = FP16_LOSS_SCALE):
    """Logits, the ascent direction's gradient for the input only (no parameter .grad), and
    the loss scale that worked.

    The attacks run in the caller's precision: under torch.autocast the model computes in
    bf16 or fp16, while x_adv, the gradient and the projection stay fp32, so the eps bound
    is exact. In fp16 the backward pass would flush small gradients to 0, and PGD's step
    sign(0) = 0 would not move the pixel. So the backward pass starts from the logit
    gradient of each sample scaled to a largest entry of `scale` (_scaled_logit_grad): PGD
    uses only the sign of the input gradient, which a positive factor per sample does not
    change when samples are independent (eval mode); when train-mode BatchNorm couples them,
    one factor scales the whole batch. If the result overflows, the backward pass is repeated
    at scale / 16; the caller keeps the returned scale for its next step.
    """
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        if not _fp16_autocast(x_adv.device):
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            grad, = torch.autograd.grad(-loss if targeted else loss, x_adv)
            return logits.detach(), grad, scale
        coupled = _couples_samples(model)
        synced = coupled and _syncs_processes(model)
        while True:
            g = _scaled_logit_grad(logits, y, targeted, scale, not coupled, synced)
            grad, = torch.autograd.grad(logits, x_adv, grad_outputs=g, retain_graph=scale > 1)
            if scale <= 1 or _all_finite(grad, synced):
                return logits.detach(), grad, scale
            scale /= 16


def _pgd_run(model, x, y, eps, step, steps: int, random_start: bool, targeted: bool):
    """One PGD run: x_{t+1} = Proj(x_t + step * sign(grad)); returns the last iterate."""
    x_adv, scale, (lo, hi) = _random_start(x, eps, random_start), FP16_LOSS_SCALE, _box(x, eps)
    for _ in range(steps):
        _, grad, scale = _input_grad(model, x_adv, y, targeted, scale)
        x_adv = _project(x_adv + step * grad.sign(), lo, hi)
    return x_adv


def _success(logits, y, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, *, steps: int = 10,
               step_size: Step = 2 / PIXEL, random_start: bool = True, targeted: bool = False,
               restarts: int = 1) -> torch.Tensor:
    """L-inf PGD (Madry et al.) with a radius and a step per sample: PGD_k(x, y, eps_i) of Alg 1.

    eps and step_size: a float or a (B,) tensor (step_size may also be a function of the
    per-sample eps). The result lies in [0,1] with |x_adv_i - x_i|_inf <= eps_i; eps_i = 0
    returns x_i unchanged. `targeted=True` moves towards the labels `y` instead of away.
    With `restarts`, each sample keeps its worst case: the first restart that succeeds,
    otherwise the one with the highest attack loss. The model's train/eval mode is used as
    found and left as found; gradients are taken for the input only.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    x = x.detach()  # the result is data, not part of the caller's graph
    eps_b = _per_sample(eps, x)
    step = _steps_for(step_size, eps_b, x)
    best = best_win = best_obj = None
    for _ in range(restarts):
        x_adv = _pgd_run(model, x, y, eps_b, step, steps, random_start, targeted)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            logits = model(x_adv)
        win = _success(logits, y, targeted)
        obj = F.cross_entropy(logits, y, reduction="none") * (-1 if targeted else 1)
        if best is None:
            best, best_win, best_obj = x_adv, win, obj
            continue
        take = ~best_win & (win | (obj > best_obj))
        best = torch.where(_per_sample(take, x).bool(), x_adv, best)
        best_win, best_obj = best_win | win, torch.where(take, obj, best_obj)
    return best


def pgd_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, *, steps: int = 10,
               step_size: Step = 2 / PIXEL, early_exit: bool = True) -> torch.Tensor:
    """Does PGD at eps_i find an image of another class? (B,) bool, the test of Alg 2 l.4 and 6.

    A sample counts as fooled when any iterate x_0..x_k is misclassified: the paper's "PGD
    succeeded in finding an image with a different class label". A fooled sample's answer is
    then fixed, so with `early_exit` it leaves the attack and the rest run on. Call this in
    eval mode: samples are then independent and early exit changes no decision.
    """
    x = x.detach()
    eps_b = _per_sample(eps, x)
    step = _steps_for(step_size, eps_b, x)
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    alive = torch.arange(len(x), device=x.device)  # the samples still attacked
    x_adv, scale, (lo, hi) = _random_start(x, eps_b, True), FP16_LOSS_SCALE, _box(x, eps_b)
    for t in range(steps + 1):
        if t == steps:
            with torch.no_grad():
                logits = model(x_adv)
        else:
            logits, grad, scale = _input_grad(model, x_adv, y, False, scale)
        hit = logits.argmax(1) != y
        fooled[alive] = fooled[alive] | hit
        if t == steps:
            break
        x_adv = _project(x_adv + step * grad.sign(), lo, hi)
        if early_exit:  # one host sync per step: how many samples stay
            keep = (~hit).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            if len(keep) < len(alive):
                alive, x_adv, y, lo, hi, step = (v.index_select(0, keep)
                                                 for v in (alive, x_adv, y, lo, hi, step))
    return fooled


# ============================================================================================
# Epsilon selection: paper Algorithm 2, and the exact line search of Sec 5.2
# ============================================================================================

def select_epsilon(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_prev: torch.Tensor, *,
                   gamma: float, beta: float, steps: int = 10, step_size: Step = 2 / PIXEL,
                   eps_min: float = 0.0, eps_max: Optional[float] = None) -> torch.Tensor:
    """Paper Algorithm 2: the new radius eps_i of each sample, shape (B,).

    l.1-3   candidates prev + gamma, prev, prev - gamma, with prev = mem[i] (`eps_prev`)
    l.4-5   if PGD at prev + gamma keeps the label y_i: choose prev + gamma
    l.6-7   elif PGD at prev keeps it: choose prev (attacked only on the samples fooled at l.4)
    l.8-9   else: choose prev - gamma, clipped at 0
    l.11    eps_i = (1 - beta) * prev + beta * chosen, then clipped to [eps_min, eps_max]
    The caller stores eps_i as mem[i] (l.12). Both attacks are measurements: they run in eval
    mode and leave BatchNorm statistics and the model's mode alone.
    """
    prev = eps_prev.to(x.device, x.dtype)
    with model_mode(model, False):
        chosen = prev + gamma
        up_fooled = pgd_fooled(model, x, y, chosen, steps=steps, step_size=step_size)
        sub = up_fooled.nonzero().squeeze(1)
        if len(sub):
            prev_fooled = pgd_fooled(model, x[sub], y[sub], prev[sub], steps=steps,
                                     step_size=_take(step_size, sub))
            chosen[sub] = torch.where(prev_fooled, prev[sub] - gamma, prev[sub])
    eps = (1 - beta) * prev + beta * chosen.clamp(min=0)
    return eps.clamp(min=eps_min, max=eps_max)


def line_search_epsilon(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eta: float,
                        eps_max: float, steps: int = 10, step_size: Step = 2 / PIXEL,
                        eps_min: float = 0.0) -> torch.Tensor:
    """Exact line search (paper Sec 5.2, Table 7): the largest eps in {eta, 2 eta, ..., eps_max}
    at which PGD does not fool the model, 0 where every radius fools it.

    The grid is scanned from the top; a sample leaves once it survives, so this is the largest
    surviving radius. The estimate replaces Alg 2 wholesale (no memory, no averaging); it is
    clipped below at eps_min. Runs in eval mode, like Alg 2.
    """
    eps = torch.zeros(len(x), device=x.device)
    todo = torch.arange(len(x), device=x.device)
    with model_mode(model, False):
        for k in range(int(eps_max / eta + 1e-6), 0, -1):
            if not len(todo):
                break
            fooled = pgd_fooled(model, x[todo], y[todo], k * eta, steps=steps,
                                step_size=_take(step_size, todo))
            eps[todo[~fooled]] = k * eta
            todo = todo[fooled]
    return eps.clamp(min=eps_min)


# ============================================================================================
# Training: paper Algorithm 1 and the PGD-AT / clean baselines
# ============================================================================================

def step_rule(cfg: Config, steps: Optional[int] = None) -> Step:
    """The PGD step: fixed (Table 10), or step_rel * eps_i / k (--step-rel)."""
    if cfg.step_rel is None:
        return cfg.step_size
    return lambda eps: cfg.step_rel * eps / (steps or cfg.attack_steps)


def selection_attack(cfg: Config) -> dict:
    """Steps and step of Alg 2's attacks: the training attack's, unless --select-steps and
    --select-step-size make them weaker (ImageNet: PGD-10 selects, PGD-30 trains)."""
    steps = cfg.select_steps or cfg.attack_steps
    if cfg.select_step_size is not None:
        return {"steps": steps, "step_size": cfg.select_step_size}
    return {"steps": steps, "step_size": step_rule(cfg, steps)}


def choose_epsilon(model, x, y, idx, mem: torch.Tensor, epoch: int, cfg: Config) -> torch.Tensor:
    """Alg 1 l.3-6: eps_w in warmup, otherwise Alg 2 (or the line search); updates mem[idx]."""
    if epoch < cfg.warmup:
        return torch.full_like(mem[idx], cfg.eps_w)
    if cfg.line_search:
        eps = line_search_epsilon(model, x, y, eta=cfg.line_eta, eps_max=cfg.line_max,
                                  eps_min=cfg.eps_min, **selection_attack(cfg))
    else:
        eps = select_epsilon(model, x, y, mem[idx], gamma=cfg.gamma, beta=cfg.beta,
                             eps_min=cfg.eps_min, eps_max=cfg.eps_max, **selection_attack(cfg))
    mem[idx] = eps
    return eps


def clean_correct(model, x, y) -> torch.Tensor:
    """Alg 1 l.9-10: S+ = samples classified correctly on the clean input (eval mode)."""
    with torch.no_grad(), model_mode(model, False):
        return model(x).argmax(1) == y


def training_inputs(model, x, y, eps: torch.Tensor, correct: torch.Tensor, cfg: Config):
    """Alg 1 l.7-11 as one batch: x_adv_i (PGD at eps_i) for S+, the clean x_i for S-.

    Attacking with eps_i = 0 for S- returns those x_i unchanged, so the mean cross-entropy of
    this batch is exactly the loss of Alg 1 l.11.
    """
    with model_mode(model, cfg.attack_bn == "train"):
        return pgd_attack(model, x, y, eps * correct, steps=cfg.attack_steps,
                          step_size=step_rule(cfg))


def train_step(model, opt, x, y, idx, mem, epoch: int, cfg: Config, net=None,
               scaler=None) -> dict:
    """One SGD step of IAAT (Alg 1), PGD-AT (eps_w for all, no S-) or clean training.

    Attacks and selection use the bare `model`; the training forward and backward go through
    `net`, its DistributedDataParallel wrapper under torchrun (gradients are averaged there).
    With --amp all of it runs under autocast; fp16 needs the GradScaler `scaler`.
    """
    with autocast(cfg, x.device):
        if cfg.method == "iaat":
            correct = clean_correct(model, x, y)
            eps = choose_epsilon(model, x, y, idx, mem, epoch, cfg)
            x_in = training_inputs(model, x, y, eps, correct, cfg)
        elif cfg.method == "at":
            eps = torch.full_like(mem[idx], cfg.eps_w)
            with model_mode(model, cfg.attack_bn == "train"):
                x_in = pgd_attack(model, x, y, eps, steps=cfg.attack_steps,
                                  step_size=step_rule(cfg))
        else:
            eps, x_in = torch.zeros_like(mem[idx]), x
        model.train()
        logits = (net or model)(x_in)
        loss = F.cross_entropy(logits.float(), y)
    optimizer_step(opt, loss, scaler)
    with torch.no_grad():
        stats = {"loss": loss.detach() * len(y), "train_acc": (logits.argmax(1) == y).sum(),
                 "eps": eps.sum(), "n": torch.tensor(len(y), device=y.device)}
        if cfg.method == "iaat":
            stats["clean_acc"] = correct.sum()
    return stats


def optimizer_step(opt, loss: torch.Tensor, scaler=None) -> None:
    """Backward and SGD step; through the fp16 GradScaler when one is enabled."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def autocast(cfg: Config, device: torch.device):
    """torch.autocast in --amp's dtype (disabled for none). The attacks inside run in it too."""
    return torch.autocast(device.type, dtype=AMP[cfg.amp], enabled=AMP[cfg.amp] is not None)


def fast_model(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Apply the speed settings that change no algorithm (DESIGN 7): cuDNN autotuning, the
    channels_last layout (in place) and torch.compile. Returns the module to call; it shares
    its weights with `model`, whose state_dict stays the plain one."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    # the selection attacks shrink the batch as samples leave, so shapes are dynamic
    return torch.compile(model, dynamic=True) if cfg.compile else model


def channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda"
                                         and cfg.amp != "none")


def make_optimizer(model, cfg: Config):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_milestones), cfg.lr_decay)
    return opt, sched


# ============================================================================================
# Evaluation: natural and robust accuracy, transfer, Table 3 attacks, corruptions and mCE
# ============================================================================================

def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
             step_size: float, restarts: int = 1, batch_size: int = 500,
             distributed: bool = False) -> dict:
    """Natural and PGD accuracy, in eval mode and FP32. With `distributed` (every process of a
    torchrun job must call it then), each process takes a shard of the examples and the
    correct counts are summed over processes: exact, never a mean of per-process means."""
    mine = shard(torch.arange(len(y), device=y.device), current_dist() if distributed else Dist())
    counts = torch.zeros(2, device=y.device)  # correct clean, correct under attack
    with model_mode(model, False):
        for batch in mine.split(batch_size):
            x, t = to_float(x_u8[batch]), y[batch]
            with torch.no_grad():
                counts[0] += (model(x).argmax(1) == t).sum()
            x_adv = pgd_attack(model, x, t, eps, steps=steps, step_size=step_size,
                               restarts=restarts)
            with torch.no_grad():
                counts[1] += (model(x_adv).argmax(1) == t).sum()
    clean, robust = (all_sum(counts) if distributed else counts).tolist()
    return {"clean": clean / len(y), "robust": robust / len(y)}


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
            xa, ya, ea, sa = x[alive], y[alive], _take(eps, alive), _take(step_size, alive)
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
    eps_b = _per_sample(eps, x)
    step = _steps_for(step_size, eps_b, x)
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    rows, last = {}, max(steps)
    with model_mode(model, False):
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        # random starts for the clean-correct samples only, drawn like attack_correct's
        x_adv, start = x.clone(), ok.nonzero().flatten()
        x_adv[start] = _random_start(x[start], eps_b[start], True)
        lo, hi = _box(x, eps_b)
        for t in range(last + 1):
            alive = ok.nonzero().flatten()
            if len(alive) and t < last:
                logits, grad, _ = _input_grad(model, x_adv[alive], y[alive], False)
                x_adv[alive] = _project(x_adv[alive] + step[alive] * grad.sign(), lo[alive],
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
    """(B,) bool: correct on PGD images crafted on `surrogate`, an independently trained copy
    (paper Sec 4: PGD-1000 x 2; each sample keeps the surrogate's worst restart)."""
    with model_mode(surrogate, False):
        x_adv = pgd_attack(surrogate, x, y, eps, steps=steps, step_size=step_size,
                           restarts=restarts)
    with model_mode(model, False), torch.no_grad():
        return model(x_adv).argmax(1) == y


def cw_margin(logits: torch.Tensor, y: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y, the loss of CW-PGD (Madry et al.): summed
    over the batch, or per sample with reduction="none" (negative: classified correctly)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -float("inf")).amax(1)
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    return (other - true).sum() if reduction == "sum" else other - true


LIBRARY_ATTACKS = ("deepfool", "mifgsm", "cw40", "autoattack")


def library_attack(name: str, model: nn.Module, *, eps: float, step_size: float,
                   num_classes: int, seed: int = 0, steps: int = 10):
    """An attack from torchattacks, with the settings of paper Table 3 or AutoAttack:

    deepfool    DeepFool (L2, 50 steps, overshoot 0.02); the caller clips it into the eps-ball
    mifgsm      MI-FGSM (Dong et al.): 10 steps of eps/10, momentum decay 1.0
    cw40        PGD-40 on the CW margin loss, random start, step `step_size`
    autoattack  AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein)
    pgd         torchattacks' PGD with `steps` (used to cross-check our pgd_attack)
    """
    import torchattacks as ta
    if name == "deepfool":
        return ta.DeepFool(model, steps=50, overshoot=0.02)
    if name == "mifgsm":
        return ta.MIFGSM(model, eps=eps, alpha=eps / 10, steps=10, decay=1.0)
    if name == "cw40":
        return ta.UPGD(model, eps=eps, alpha=step_size, steps=40, random_start=True, decay=0.0,
                       loss=lambda images, labels, _target: cw_margin(model(images), labels))
    if name == "autoattack":
        # torchattacks' n_classes sets the targets of APGD-T and FAB-T to n_classes - 1; the
        # standard version uses the 9 most likely other classes, also on CIFAR-100
        return ta.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                             n_classes=min(num_classes, 10), seed=seed)
    if name == "pgd":
        return ta.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(LIBRARY_ATTACKS)}, pgd")


def library_correct(attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """(B,) bool: correct on a torchattacks attack's images, clipped into the eps-ball
    (a no-op for the L-inf attacks; it bounds DeepFool's minimal L2 perturbation)."""
    with model_mode(model, False):
        x_adv = attack(x, y).detach()
        x_adv = _project(torch.where(torch.isfinite(x_adv), x_adv, x), *_box(x, eps))
        with torch.no_grad():
            return model(x_adv).argmax(1) == y


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
# Distributed: torchrun processes, shards of each global batch, one consistent eps memory
# ============================================================================================

@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:  # rank 0 alone logs and writes files
        return self.rank == 0


def current_dist() -> Dist:
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_name: str) -> bool:
    """Join the process group when torchrun started us with more than one process (it sets
    RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables): nccl on GPUs, gloo on CPU."""
    import torch.distributed as tdist
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or tdist.is_initialized():
        return False
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # After a restart (--max-restarts) torchrun's store still holds the addresses of the
        # dead attempt's processes, and gloo would connect to those; key this attempt apart.
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False)
        tdist.init_process_group(backend, store=tdist.PrefixStore(f"iaat/attempt{attempt}", base),
                                 rank=rank, world_size=world)
    else:
        tdist.init_process_group(backend)
    return True


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place); a no-op in a single process."""
    if current_dist().world > 1:
        torch.distributed.all_reduce(t)
    return t


def shard(chunk: torch.Tensor, d: Dist) -> torch.Tensor:
    """This process's part of a global batch: contiguous, disjoint, sizes differ by at most
    one, so the per-process batch is global batch / world and every index is visited once."""
    return chunk.tensor_split(d.world)[d.rank]


def sync_memory(mem: torch.Tensor, visits: torch.Tensor, idx: torch.Tensor, width: int,
                d: Dist) -> None:
    """After a step every process has written eps for its own samples `idx` into its copy of
    the memory. All-gather the (index, eps) pairs, so that every copy holds every update, and
    count the updates each sample received in `visits` (once per epoch if the shards are
    right). `width` is the largest shard size of this global batch."""
    if d.world > 1:
        ids = torch.full((width,), -1, dtype=torch.long, device=mem.device)
        ids[:len(idx)] = idx
        vals = torch.zeros(width, device=mem.device)
        vals[:len(idx)] = mem[idx]
        all_ids, all_vals = [torch.empty_like(ids) for _ in range(d.world)], \
            [torch.empty_like(vals) for _ in range(d.world)]
        torch.distributed.all_gather(all_ids, ids)
        torch.distributed.all_gather(all_vals, vals)
        ids, vals = torch.cat(all_ids), torch.cat(all_vals)
        keep = ids >= 0  # drop the padding
        idx = ids[keep]
        mem[idx] = vals[keep]
    visits.index_add_(0, idx, torch.ones_like(idx, dtype=visits.dtype))


def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics): each process updated them
    on its own shard, and the evaluated and saved model must be one model."""
    if current_dist().world > 1:
        for b in model.buffers():
            torch.distributed.broadcast(b, 0)


def gather_everywhere(value) -> list:
    """Every process's `value` (a small picklable object), in rank order, on every process."""
    if current_dist().world == 1:
        return [value]
    everyone = [None] * current_dist().world
    torch.distributed.all_gather_object(everyone, value)
    return everyone


def same_everywhere(value, what: str) -> None:
    """Raise on every process if `value` differs between processes (e.g. where each one
    resumes: the run folder must be on a filesystem all of them share)."""
    everyone = gather_everywhere(value)
    if any(v != everyone[0] for v in everyone):
        raise IAATError(f"the processes disagree on {what}: {everyone}; is --out on a "
                        "filesystem all of them share?")


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if current_dist().world > 1:
        torch.distributed.barrier()


def any_process(flag: bool, device) -> bool:
    """True on every process if it is true on one (all processes stop at the same step)."""
    if current_dist().world == 1:
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device)) > 0)


def digests_everywhere(tensors) -> list:
    """SHA-1 of these tensors on every process, gathered to all (to check they are equal)."""
    import hashlib
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return gather_everywhere(h.hexdigest())


# ============================================================================================
# Checkpoints and outputs: atomic writes, resume, metrics, eps history, plots
# ============================================================================================

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`: a kill at
    any moment leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state(gen: Optional[torch.Generator], device: torch.device) -> dict:
    """The CPU generator, this process's GPU generator, and the epoch's data generator."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if gen is not None:
        state["data"] = gen.get_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, *, cfg, model, opt, sched, mem, visits, epoch, step, totals,
                    gen, scaler=None) -> None:
    """Everything needed to resume exactly: weights, optimiser, schedule, eps memory, RNGs,
    and the fp16 GradScaler's scale."""
    ckpt = {"format": 1, "config": config_dict(cfg), "device": mem.device.type,
            "epoch": epoch, "step": step,
            "totals": {k: float(v) for k, v in totals.items()}, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "eps_memory": mem.cpu(), "eps_visits": visits.cpu(), "rng": rng_state(gen, mem.device),
            "scaler": scaler.state_dict() if scaler is not None else {}}
    atomic_write(path, lambda p: torch.save(ckpt, p))


def read_checkpoint(path: Path) -> dict:
    """A checkpoint read with weights_only=True and checked field by field; IAATError if not."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding arbitrary objects
        raise IAATError(f"checkpoint {path} is unreadable ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    fields = {"config": dict, "device": str, "epoch": int, "step": int, "totals": dict,
              "model": dict, "optimizer": dict, "scheduler": dict, "eps_memory": torch.Tensor,
              "eps_visits": torch.Tensor, "rng": dict}
    bad = [k for k, kind in fields.items() if not isinstance(ckpt.get(k), kind)] \
        if isinstance(ckpt, dict) else ["all"]
    if bad or ckpt.get("format") != 1:
        raise IAATError(f"checkpoint {path} is not a complete iaat checkpoint (missing "
                        f"{', '.join(bad) or 'format 1'})")
    return ckpt


def load_checkpoint(path: Path, cfg: Config) -> dict:
    """Read a checkpoint as plain tensors and containers (weights_only=True, read_checkpoint)
    and check that it belongs to this configuration; raise IAATError on a corrupt or
    mismatched file."""
    try:
        ckpt = read_checkpoint(path)
    except IAATError as err:
        raise IAATError(f"{err}; move the run folder away to start afresh") from None
    mine, theirs = config_dict(cfg), ckpt["config"]
    diff = [k for k in mine if k not in RUNTIME_FIELDS and mine[k] != saved_setting(theirs, k)]
    if diff:
        k = diff[0]
        raise IAATError(f"checkpoint {path} was written with {k}={theirs.get(k)!r}, this run has "
                        f"{k}={mine[k]!r}; rerun with the same settings or choose another --out")
    return ckpt


def saved_setting(saved: dict, name: str):
    """A setting from a saved config; one saved before the setting existed has its default."""
    return saved.get(name, Config.__dataclass_fields__[name].default)


def config_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["lr_milestones"] = list(d["lr_milestones"])
    return d


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def read_metrics(path: Path, upto_epoch: int) -> list:
    """The metrics lines of epochs <= upto_epoch (a resumed run drops lines written later)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def write_metrics(path: Path, rows: list) -> None:
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def write_eps_history(path: Path, history: np.ndarray) -> None:
    """(epochs, n_train): the eps memory after each epoch, row e = after epoch e+1 (float32
    here; imagenet/train.py stores float16)."""
    def save(p):
        with open(p, "wb") as f:
            np.save(f, history)
    atomic_write(path, save)


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
    for key, label in [("train_acc", "train (on training inputs)"), ("test_clean", "test clean"),
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


# ============================================================================================
# The training run: Alg 1 over epochs, with outputs, resume and SIGTERM
# ============================================================================================

class _Stop:
    """Set by SIGTERM; the loop checkpoints at the next step boundary and exits."""
    requested = False


def _on_sigterm(signum, frame):
    _Stop.requested = True


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise IAATError("--device cuda was asked for, but no CUDA device is available")
    if name == "cuda" and local_rank >= torch.cuda.device_count():
        raise IAATError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                        "run one process per GPU")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def train(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Train one run into run_dir(cfg), resuming if its checkpoint exists; return the summary.

    Writes checkpoint.pt, metrics.jsonl, eps_history.npy, curves.png, eps_hist.png,
    eps_mean.png and summary.json. Raises IAATError on bad input or a non-finite loss.
    Under torchrun every process runs this; each trains on its shard of every global batch,
    the eps memories are kept identical, and rank 0 alone logs and writes.
    """
    from tqdm import tqdm  # the plain bar: silent outside a terminal, notebooks included
    d = current_dist()
    log = log if d.main else (lambda msg: None)
    out = run_dir(cfg)
    ckpt_path, metrics_path, hist_path = (out / "checkpoint.pt", out / "metrics.jsonl",
                                          out / "eps_history.npy")
    ckpt = load_checkpoint(ckpt_path, cfg) if ckpt_path.exists() else _check_fresh(out)
    device = pick_device(cfg.device, d.local_rank)
    if ckpt is not None and ckpt["device"] != device.type:
        raise IAATError(f"checkpoint {ckpt_path} was written on {ckpt['device']}, this run is on "
                        f"{device.type}; resume on {ckpt['device']} (--device) for the same result")
    if d.local_rank > 0:  # local rank 0 downloads first; the others then read its files
        torch.distributed.barrier()
    data = load_data(cfg, device)
    if d.world > 1 and d.local_rank == 0:
        torch.distributed.barrier()
    n = len(data.train_y)
    if cfg.batch_size < d.world:
        raise IAATError(f"--batch-size {cfg.batch_size} is smaller than the {d.world} processes")
    if 0 < n % cfg.batch_size < d.world:
        raise IAATError(f"the last batch of each epoch ({n % cfg.batch_size} images) cannot be "
                        f"shared by {d.world} processes; choose another --batch-size")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.mean, data.std).to(device)
    fast = fast_model(model, cfg, device)
    net = fast if d.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    net = torch.compile(net) if cfg.compile and d.world > 1 else net
    opt, sched = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    layout = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
    mem = torch.full((n,), cfg.eps_init if cfg.eps_init is not None else cfg.eps_w, device=device)
    visits = torch.zeros(n, dtype=torch.int32, device=device)  # Alg 2 updates of each sample
    epoch, step, totals, history = 0, 0, {}, np.zeros((0, n), np.float32)
    if ckpt is not None:
        epoch, step, totals = restore(ckpt, ckpt_path, model, opt, sched, mem, visits, scaler)
        if hist_path.exists() and d.main:
            history = np.load(hist_path)[:epoch]
        log(f"resuming {out} at epoch {epoch} step {step}")
    if d.rank > 0:  # its own attack random starts; the saved totals are counted on rank 0
        torch.manual_seed(cfg.seed + 7919 * d.rank + 104729 * (epoch * 100_003 + step))
        totals = {}
    same_everywhere((epoch, step), "the epoch and step to resume at")
    lock = problem = None  # every process has read the folder; now rank 0 claims it
    if d.main:
        try:
            lock = claim_run_dir(out)
        except IAATError as err:
            problem = err
    if any_process(problem is not None, device):
        raise problem or IAATError(f"rank 0 could not claim {out}")
    rows = read_metrics(metrics_path, epoch)
    if ckpt is None and d.main:
        write_json(out / "config.json", config_dict(cfg))
    _Stop.requested = False
    prev_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    steps_per_epoch = math.ceil(n / cfg.batch_size)

    def save(epoch, step, totals, gen):
        if d.main:
            save_checkpoint(ckpt_path, cfg=cfg, model=model, opt=opt, sched=sched, mem=mem,
                            visits=visits, epoch=epoch, step=step, totals=totals, gen=gen,
                            scaler=scaler)
    try:
        while epoch < cfg.epochs:
            t0 = time.time() - totals.get("time", 0.0)
            perm, gen = epoch_streams(cfg, d, epoch, n, device,
                                      ckpt["rng"].get("data") if step else None)
            sums = {k: torch.tensor(v, device=device) for k, v in totals.items() if k != "time"}
            bar = tqdm(range(step, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, disable=None if d.main else True, initial=step,
                       total=steps_per_epoch)
            for step in bar:
                chunk = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]  # global batch
                idx = shard(chunk, d)
                x, y = augment(data.train_x[idx], data.augment, gen), data.train_y[idx]
                x = x.contiguous(memory_format=layout)
                for k, v in train_step(fast, opt, x, y, idx, mem, epoch, cfg, net,
                                       scaler).items():
                    sums[k] = sums.get(k, 0) + v
                if cfg.method == "iaat" and epoch >= cfg.warmup:
                    sync_memory(mem, visits, idx, math.ceil(len(chunk) / d.world), d)
                stop = any_process(_Stop.requested, device)
                if step + 1 < steps_per_epoch and (
                        stop or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
                    totals = global_totals(sums)
                    _check_finite(totals["loss"], model, epoch, step, ckpt_path)
                    totals["time"] = time.time() - t0
                    save(epoch, step + 1, totals, gen)
                    if stop:
                        barrier()  # nobody exits before rank 0's checkpoint is on disk
                        raise SystemExit(_stopped(log, out, epoch, step + 1))
            bar.close()
            totals = global_totals(sums)
            _check_finite(totals["loss"], model, epoch, steps_per_epoch, ckpt_path)
            sched.step()
            epoch, step = epoch + 1, 0
            sync_buffers(model)
            if cfg.method == "at":
                mem.fill_(cfg.eps_w)
            elif cfg.method == "clean":
                mem.zero_()
            rows.append(_epoch_row(model, data, cfg, epoch, totals, opt, time.time() - t0))
            totals = {}
            log(_format_row(rows[-1], cfg))
            if d.main:
                history = np.concatenate([history, mem.cpu().numpy()[None]])
                write_eps_history(hist_path, history)
                write_metrics(metrics_path, rows)
                save(epoch, 0, {}, None)
                if epoch == cfg.epochs or (cfg.plot_every and epoch % cfg.plot_every == 0):
                    plot_run(out, rows, history, cfg.warmup)
            if any_process(_Stop.requested, device):
                raise SystemExit(_stopped(log, out, epoch, 0))
    finally:
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, prev_handler)
        if lock is not None:
            lock.close()
    return finish(model, data, cfg, out, rows, history, mem, visits, log)


def train_or_load(cfg: Config, log: Optional[Callable[[str], None]] = None,
                  train_missing: bool = True) -> dict:
    """The summary of run_dir(cfg): read from its summary.json when that run has finished with
    these settings, else train (or resume) it first, or with train_missing=False raise
    IAATError. Notebooks use it to render runs made elsewhere (say, CIFAR on a GPU) without
    retraining or re-evaluating them."""
    out = run_dir(cfg)
    summary, config = out / "summary.json", out / "config.json"
    if summary.is_file() and config.is_file():
        mine, theirs = config_dict(cfg), json.loads(config.read_text())
        done = json.loads(summary.read_text())
        if done.get("epochs") == cfg.epochs and all(
                mine[k] == saved_setting(theirs, k) for k in mine if k not in RUNTIME_FIELDS):
            return done
    if not train_missing:
        raise IAATError(f"no finished run with these settings in {out}; train it first")
    return train(cfg, log or (lambda msg: None))


def epoch_streams(cfg: Config, d: Dist, epoch: int, n: int, device, saved_state=None):
    """The epoch's permutation (the same on every process) and this process's augmentation
    generator: rank 0 continues the permutation's generator (restored mid-epoch from
    `saved_state`), other ranks draw their own."""
    gen = epoch_generator(cfg.seed, epoch, device)
    perm = torch.randperm(n, generator=gen, device=device)
    if d.rank > 0:
        gen = epoch_generator(cfg.seed + 7919 * d.rank, epoch, device)
    elif saved_state is not None:
        gen.set_state(saved_state)
    return perm, gen


def global_totals(sums: dict) -> dict:
    """The epoch's running sums over all processes, as floats (one all-reduce)."""
    keys = sorted(sums)
    values = all_sum(torch.stack([sums[k].double() for k in keys])).tolist()
    return dict(zip(keys, values))


OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "eps_history.npy", "summary.json", "config.json")


def _check_fresh(out: Path) -> None:
    """A fresh run must not overwrite another run's outputs (say, after its checkpoint was
    moved away): refuse a folder that holds any of them."""
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found:
        raise IAATError(f"{out} holds {found[0]} but no checkpoint; move the whole folder away "
                        "or choose another --out")


def restore(ckpt: dict, path: Path, model, opt, sched, mem, visits, scaler=None,
            data_state: bool = True) -> tuple:
    """Load a checked checkpoint into the run's objects; returns (epoch, step, totals).
    `data_state`: a mid-epoch checkpoint must hold the data generator's state."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt["eps_memory"].shape != mem.shape:
            raise ValueError(f"eps memory of {len(ckpt['eps_memory'])} samples, data has "
                             f"{len(mem)}")
        if ckpt["step"] and data_state and "data" not in ckpt["rng"]:
            raise KeyError("the mid-epoch data generator state is missing")
        mem.copy_(ckpt["eps_memory"])
        visits.copy_(ckpt["eps_visits"])
        set_rng_state(ckpt["rng"], mem.device)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise IAATError(f"checkpoint {path} does not match this run: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return ckpt["epoch"], ckpt["step"], ckpt["totals"]


def claim_run_dir(out: Path):
    """Create the run folder and lock it for this process (two copies of one command must not
    train into one folder); remove temporary files a killed writer left. Returns the lock."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): run unlocked
        pass
    except OSError:
        lock.close()
        raise IAATError(f"another process is training in {out}; wait for it or stop it") from None
    for stale in out.glob(".*.tmp*"):
        stale.unlink()
    return lock


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _stopped(log, out, epoch, step) -> int:
    log(f"SIGTERM: checkpoint saved at epoch {epoch} step {step} in {out}; rerun the same "
        "command to resume")
    return 143


def _check_finite(loss: float, model, epoch: int, step: int, ckpt_path: Path) -> None:
    """Stop before a non-finite loss or weight reaches a checkpoint; the last good one stays."""
    finite = math.isfinite(loss) and all(
        bool(torch.isfinite(p).all()) for p in model.parameters())
    if not finite:
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else \
            "no checkpoint was written"
        raise IAATError(f"training loss became non-finite in epoch {epoch + 1} (by step {step}); "
                        f"{kept}; try a lower --lr")


def _epoch_row(model, data: Data, cfg: Config, epoch: int, sums: dict, opt, seconds: float) -> dict:
    n = float(sums["n"])
    row = {"epoch": epoch, "images": int(n), "lr": opt.param_groups[0]["lr"],
           "train_loss": float(sums["loss"]) / n,
           "train_acc": float(sums["train_acc"]) / n, "eps_mean": float(sums["eps"]) / n}
    if "clean_acc" in sums:
        row["train_clean_acc"] = float(sums["clean_acc"]) / n
    if cfg.eval_subset:
        k = min(cfg.eval_subset, len(data.test_y))
        acc = evaluate(model, data.test_x[:k], data.test_y[:k], eps=cfg.eps_test,
                       steps=cfg.attack_steps, step_size=cfg.eval_step_size,
                       batch_size=cfg.eval_batch, distributed=True)
        row.update(test_clean=acc["clean"], test_pgd=acc["robust"])
    row["seconds"] = round(seconds, 2)
    return row


def _format_row(r: dict, cfg: Config) -> str:
    s = (f"epoch {r['epoch']:3d}/{cfg.epochs} | loss {r['train_loss']:.3f} | train acc "
         f"{r['train_acc']:.3f} | eps {r['eps_mean'] * PIXEL:5.1f}/255")
    if "test_clean" in r:
        s += f" | test clean {r['test_clean']:.3f} PGD-{cfg.attack_steps} {r['test_pgd']:.3f}"
    return s + f" | {r['seconds']:.1f}s"


def finish(model, data: Data, cfg: Config, out: Path, rows: list, history, mem, visits,
           log) -> dict:
    """Natural and PGD-20 accuracy on the whole test set at eps_test; summary.json and a line.
    Also checks that every process ended with the same eps memory and model, and that every
    image was selected once per epoch after warmup."""
    acc = evaluate(model, data.test_x, data.test_y, eps=cfg.eps_test, steps=cfg.eval_steps,
                   step_size=cfg.eval_step_size, batch_size=cfg.eval_batch, distributed=True)
    digests, models = digests_everywhere([mem]), digests_everywhere(model.state_dict().values())
    for name, found in (("eps memories", digests), ("models (weights and BN statistics)", models)):
        if len(set(found)) > 1:
            raise IAATError(f"the {name} of the {len(found)} processes differ: {found}")
    done = rows[-1]["epoch"] if rows else 0
    expected = max(0, done - cfg.warmup) if cfg.method == "iaat" else 0
    if rows and not bool((visits == expected).all()):
        raise IAATError(f"some images were not selected exactly once per epoch after warmup "
                        f"(updates per image {int(visits.min())}-{int(visits.max())}, expected "
                        f"{expected})")
    summary = {"run": str(out), "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method,
               "seed": cfg.seed, "epochs": cfg.epochs, "natural_acc": acc["clean"],
               "pgd_acc": acc["robust"], "pgd": f"PGD-{cfg.eval_steps}",
               "eps_test_255": cfg.eps_test * PIXEL,
               "eps_mean_255": float(mem.double().mean() * PIXEL) if rows else None,
               "eps_updates_per_sample": [int(visits.min()), int(visits.max())],
               "processes": current_dist().world, "eps_memory_sha1_per_process": digests,
               "model_sha1_per_process": models,
               "train_seconds": round(sum(r["seconds"] for r in rows), 1)}
    if current_dist().main:
        write_json(out / "summary.json", summary)
        plot_run(out, rows, history, cfg.warmup)
    log(f"final {cfg.dataset} {cfg.model} {cfg.method} seed {cfg.seed}: natural "
        f"{acc['clean']:.4f} | PGD-{cfg.eval_steps} at {cfg.eps_test * PIXEL:g}/255 "
        f"{acc['robust']:.4f} | mean eps {summary['eps_mean_255'] or 0:.1f}/255 | "
        f"{summary['train_seconds']:.0f}s training | {out}")
    return summary


# ============================================================================================
# The evaluation run: `iaat eval RUN_DIR`, the paper's Sec 4 protocol on one checkpoint
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
EVAL_PARTS = ("whitebox", "transfer", "corruptions", "eps_sweep", "steps_sweep") + LIBRARY_ATTACKS


# input channels and classes of each dataset: enough to rebuild a model from its checkpoint
DATASET_SHAPES = {"digits": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100)}


def run_config(run: Path) -> tuple[Config, dict]:
    """The Config a run folder was trained with, and its checkpoint (checked, weights_only)."""
    path = run / "checkpoint.pt"
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
        raise IAATError(f"checkpoint {run / 'checkpoint.pt'} does not fit model {cfg.model}: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval()


def load_run(run, device="cpu", data_root: Optional[str] = None) -> tuple:
    """(model in eval mode, Config, Data, checkpoint epoch) of a run folder, in one call; CIFAR
    is read from `data_root` (default: where the run read it)."""
    run, device = Path(run), torch.device(device)
    cfg, ckpt = run_config(run)
    data_cfg = dataclasses.replace(cfg, data_root=data_root) if data_root else cfg
    return load_model(run, device, cfg, ckpt), cfg, load_data(data_cfg, device), ckpt["epoch"]


def eval_subset(n: int, n_examples: Optional[int], seed: int, device) -> torch.Tensor:
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
    part (a long CIFAR evaluation keeps what it has measured)."""
    with torch.autocast(y.device.type, enabled=False):  # FP32 even inside a caller's autocast
        return _run_parts(model, x_u8, y, ev, num_classes, surrogate, corruptions, target,
                          progress or (lambda res: None))


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
    if parts & {"whitebox", *LIBRARY_ATTACKS}:
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
        pick = eval_subset(n, ev["n_examples"], ev["seed"], "cpu")
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
                 ("mifgsm", "MI-FGSM"), ("cw40", "CW40"), ("autoattack", "AutoAttack"),
                 ("worst_case", "worst case"))


def table_cells(r: dict) -> dict:
    """Column title -> accuracy in % of one evaluation result, in the order of Tables 1 and 3."""
    cells = {"natural": r["natural"], **r.get("whitebox", {})}
    for key, title in TABLE_COLUMNS:
        if key in r:
            cells[title] = r[key]["mean"] if isinstance(r[key], dict) else r[key]
    return {k: 100 * v for k, v in cells.items()}


def eval_table(rows: list) -> str:
    """Markdown: one row per evaluated run, the columns that ran."""
    titles = list(dict.fromkeys(t for r in rows for t in table_cells(r)))
    lines = ["| run | " + " | ".join(titles) + " |", "|" + " --- |" * (len(titles) + 1)]
    for r in rows:
        cells = table_cells(r)
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{cells[t]:.2f}" if t in cells else "-" for t in titles) + " |")
    return "\n".join(lines)


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
    p = _Parser(prog="iaat eval", description="The paper's evaluation protocol (Sec 4, Tables 1-4, "
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
                   f"{','.join(EVAL_PARTS)} (default: all; transfer and corruptions when their "
                   "inputs are given)")
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
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--name", default="eval", help="stem of the output files (default: eval)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-root", help="where CIFAR is read from (default: the run's)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None)
    return p


def eval_settings(args, dataset: str) -> dict:
    """The preset for the run's dataset, overridden by the flags given; /255 flags converted."""
    ev = dict(EVAL_PRESETS[args.preset or ("digits" if dataset == "digits" else "paper")])
    for key in ("eps", "step_size"):
        if getattr(args, key) is not None:
            ev[key] = getattr(args, key) / PIXEL
    if args.eps_sweep is not None:
        ev["eps_sweep"] = tuple(e / PIXEL for e in args.eps_sweep)
    for key in ("whitebox", "steps_sweep", "transfer", "sweep_attack"):
        if getattr(args, key) is not None:
            ev[key] = getattr(args, key)
    parts = args.parts or set(EVAL_PARTS) - {"transfer", "corruptions"} | (
        {"transfer"} if args.surrogate else set()) | ({"corruptions"} if args.corruptions else set())
    unknown = parts - set(EVAL_PARTS)
    if unknown:
        raise IAATError(f"unknown --parts {', '.join(sorted(unknown))}; choose from "
                        f"{', '.join(EVAL_PARTS)}")
    if "transfer" in parts and not args.surrogate:
        raise IAATError("--parts transfer needs --surrogate RUN_DIR")
    if "corruptions" in parts and not args.corruptions:
        raise IAATError("--parts corruptions needs --corruptions DIR")
    if ev["step_size"] <= 0 or (args.n_examples is not None and args.n_examples < 1) \
            or args.batch_size < 1:
        raise IAATError("--step-size, --n-examples and --batch-size must be positive")
    if parts & set(LIBRARY_ATTACKS):
        import importlib.util
        if importlib.util.find_spec("torchattacks") is None:  # now, not after hours of PGD
            raise IAATError("the DeepFool, MI-FGSM, CW40 and AutoAttack parts need torchattacks "
                            "(pip install -r requirements.txt), or leave them out with --parts")
    if args.surrogate is not None and args.surrogate.resolve() == args.run.resolve():
        raise IAATError("--surrogate must be another run (an independently trained copy)")
    ev.update(parts=parts, targeted=args.targeted, n_examples=args.n_examples, seed=args.seed,
              batch_size=args.batch_size)
    return ev


def evaluate_run(argv) -> dict:
    """`iaat eval RUN_DIR ...`: load, evaluate, print the table, write JSON, markdown and plots.
    The JSON is rewritten after every part (with "complete": false until the end)."""
    args = build_eval_parser().parse_args(argv)
    cfg, ckpt = run_config(args.run)
    ev = eval_settings(args, cfg.dataset)  # bad flags fail before any data is read
    device = pick_device(args.device)
    model = load_model(args.run, device, cfg, ckpt)
    surrogate = None
    if "transfer" in ev["parts"]:
        scfg, sckpt = run_config(args.surrogate)
        if (scfg.dataset, scfg.split_seed) != (cfg.dataset, cfg.split_seed):
            raise IAATError(f"the surrogate was trained on {scfg.dataset} (split {scfg.split_seed}),"
                            f" the model on {cfg.dataset} (split {cfg.split_seed})")
        surrogate = load_model(args.surrogate, device, scfg, sckpt)
    if args.data_root is not None or args.download is not None:
        cfg = dataclasses.replace(cfg, data_root=args.data_root or cfg.data_root,
                                  download=cfg.download if args.download is None else args.download)
    data = load_data(cfg, device)
    idx = eval_subset(len(data.test_y), ev["n_examples"], ev["seed"], device)
    target = None
    if args.targeted == "random":  # drawn for the whole test set on the CPU: the same targets
        target = random_targets(data.test_y.cpu(), data.num_classes,  # on any device and subset
                                torch.Generator().manual_seed(ev["seed"])).to(device)[idx]
    if ckpt["epoch"] < cfg.epochs:
        print(f"iaat eval: note: {args.run} holds epoch {ckpt['epoch']} of {cfg.epochs}",
              file=sys.stderr)
    head = {"label": f"{cfg.dataset} {cfg.model} {cfg.method} seed {cfg.seed}",
            "run": str(args.run), "checkpoint_epoch": ckpt["epoch"], "epochs": cfg.epochs,
            "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method, "seed": cfg.seed,
            "eps_255": ev["eps"] * PIXEL, "step_size_255": ev["step_size"] * PIXEL,
            "targeted": args.targeted, "n_examples": len(idx), "eval_seed": ev["seed"],
            "surrogate": str(args.surrogate) if surrogate is not None else None,
            "corruptions_dir": str(args.corruptions) if "corruptions" in ev["parts"] else None,
            "device": device.type, "torch": torch.__version__}
    json_path = args.run / f"{args.name}.json"
    res = run_evaluation(model, data.test_x[idx], data.test_y[idx], ev=ev,
                         num_classes=data.num_classes, surrogate=surrogate,
                         corruptions=args.corruptions, target=target,
                         progress=lambda part: write_json(json_path, {**head, **part,
                                                                      "complete": False}))
    res = {**head, **res, "complete": True}
    text = (f"Evaluation of {args.run} at eps {ev['eps'] * PIXEL:g}/255, step "
            f"{ev['step_size'] * PIXEL:g}/255, {len(idx)} test images, seed {ev['seed']}"
            f"{', random-targeted white-box PGD' if target is not None else ''} (accuracy, %):\n\n"
            + eval_table([res]) + "\n" + sweep_tables(res) + "\n")
    print(text)
    write_json(json_path, res)
    atomic_write(args.run / f"{args.name}.md", lambda p: p.write_text(text))
    plot_sweeps(res, args.run, args.name)
    return res


# ============================================================================================
# CLI
# ============================================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        self.exit(2, f"iaat: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI, built from Config: one flag per field, its help text with unit and paper source.
    Flags left out take the dataset/model preset (see the epilog)."""
    presets = "\n".join(f"  {k}: " + ", ".join(f"{f}={_preset_str(f, v)}" for f, v in p.items())
                        for k, p in PRESETS.items())
    p = _Parser(prog="iaat", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"presets (override any with its flag):\n{presets}\n\nevaluate a trained "
                       "run with the paper's protocol: iaat eval RUN_DIR (see iaat eval --help)")
    for f in dataclasses.fields(Config):
        flag, unit, help = "--" + f.name.replace("_", "-"), f.metadata["unit"], f.metadata["help"]
        names = [flag] + (["--eps"] if f.name == "eps_w" else [])
        help = f"{help} [{'x/255; ' if unit else ''}default: {_default_text(f)}]"
        if f.type == "bool":
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif f.name == "lr_milestones":
            p.add_argument(*names, type=int, nargs="*", default=None, metavar="EPOCH", help=help)
        else:
            kind = int if f.type in ("int", "Optional[int]") else \
                float if "float" in f.type else str
            choices = {"dataset": DATASETS, "model": MODELS, "method": METHODS,
                       "attack_bn": ("train", "eval"), "amp": tuple(AMP),
                       "channels_last": ("auto", "on", "off"),
                       "device": ("auto", "cpu", "cuda")}.get(f.name)
            p.add_argument(*names, type=kind, default=None, choices=choices, help=help)
    return p


def _default_text(f: dataclasses.Field) -> str:
    """'0.1' or, where presets differ, 'digits 0.05, cifar 0.1, wrn32-10 0.2'."""
    base = _preset_str(f.name, f.default)
    per = [(k, _preset_str(f.name, p[f.name])) for k, p in PRESETS.items() if f.name in p]
    if not per:
        return base
    cifar = [("cifar", "resnet18" if f.name == "model" else base)]
    return ", ".join(f"{k} {v}" for k, v in per[:1] + cifar + per[1:] if v != base or k != "resnet18")


def _preset_str(name: str, value) -> str:
    unit = Config.__dataclass_fields__[name].metadata["unit"]
    if unit and isinstance(value, float):
        return f"{value * PIXEL:g}"
    return "preset" if value is None and name == "model" else str(value)


def config_from_args(argv) -> Config:
    args = vars(build_parser().parse_args(argv))
    for name, value in args.items():
        if value is not None and Config.__dataclass_fields__[name].metadata["unit"]:
            args[name] = value / PIXEL
    if args["lr_milestones"] is not None:
        args["lr_milestones"] = tuple(args["lr_milestones"])
    return make_config(args.pop("dataset") or "digits", args.pop("model"), **args)


def main(argv=None) -> int:
    """`python iaat.py [flags]`: train (or resume) one run and print its final summary;
    `python iaat.py eval RUN_DIR [flags]`: the paper's evaluation protocol on a trained run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    joined = False
    try:
        if argv[:1] == ["eval"]:
            evaluate_run(argv[1:])
            return 0
        cfg = config_from_args(argv)
        joined = init_distributed(cfg.device)
        train(cfg)
    except (IAATError, OSError) as err:  # OSError: full disk, no permission, --out a file, ...
        print(f"iaat: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("iaat: interrupted; " + ("the parts finished so far are in the JSON"
              if argv[:1] == ["eval"] else "rerun the same command to resume from the last "
              "checkpoint"), file=sys.stderr)
        return 130
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
