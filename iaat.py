"""Instance Adaptive Adversarial Training (IAAT), in one readable file.

Balaji, Goldstein & Hoffman, "Instance adaptive adversarial training: Improved accuracy
tradeoffs in neural nets", arXiv 1910.08051. PGD adversarial training puts one L-inf radius
around every training image; IAAT keeps a radius eps_i per image, grows it where the image
survives a larger attack and shrinks it where another class lies close by (paper Alg 1 and 2).

    python iaat.py                             # IAAT on the embedded digits data, CPU
    python iaat.py --method at                 # Madry PGD-AT baseline at the same eps
    python iaat.py --dataset cifar100 --model wrn32-10        # paper Table 10 preset
    torchrun --standalone --nproc_per_node=8 iaat.py --dataset cifar10   # DDP, one eps memory
    python iaat.py eval runs/digits-smallcnn-iaat-seed0      # the paper's evaluation (iaat_eval.py)

Images live in [0,1] with normalisation inside the model, so every eps, gamma and step in
the Python API is in pixel units; the CLI takes the paper's 0-255 units. Sections: config;
data; models; THE CORE (PGD with a radius per sample and Alg 2, one block to copy); Alg 1's
step (with TRADES and the weight average); torchrun; the training loop; the end-of-training
evaluation; the CLI. Checkpoints and the run folder's files are iaat_run.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# below this file (none imports iaat): fp16 gradients, run plots, the run machinery (iaat_run)
from iaat_fp16 import fp16_input_grad
from iaat_plot import plot_run
from iaat_run import (TORCH_THREADS, CLIParser, Dist, IAATError, add_dataclass_flags, agreement,
                      all_sum, any_process, best_row, current_dist, dataclass_values, exit_process,
                      keep_best, local_rank_zero_first, open_folder, open_run, pick_device,
                      process_group, reduce_and_check_totals, restore, save_checkpoint, set_threads,
                      sigterm_flag, stopped, write_eps_history, write_json, write_metrics)

PIXEL = 255.0  # the CLI's unit: --eps-w 8 means 8/255

# ===== Config and the paper's presets =======================================================

def option(default, help: str, unit: str = ""):
    """A config field whose help becomes its --help text; unit='/255' is entered in 0-255."""
    return field(default=default, metadata={"help": help, "unit": unit})

@dataclass
class Config:
    """All settings of one run. Values are in pixel units ([0,1]); the CLI divides /255 units."""
    # what to train
    dataset: str = option("digits", "digits (embedded scikit-learn data, no download), cifar10 or cifar100")
    model: Optional[str] = option(None, "smallcnn, resnet18 (PreAct ResNet-18) or wrn32-10 "
                                        "(Madry's WideResNet: 5 blocks/stage, width 10)")
    method: str = option("iaat", "iaat (paper Alg 1), at (Madry PGD-AT at the fixed radius eps_w), "
                                 "trades (TRADES at the fixed radius eps_w) or clean")
    # optimisation: paper Table 10 (CIFAR ResNet-18 column unless the preset says otherwise)
    epochs: int = option(200, "training epochs (Table 10: 200 ResNet-18, 110 WRN-32-10)")
    batch_size: int = option(128, "global batch size (Table 10: 128)")
    lr: float = option(0.1, "SGD learning rate (Table 10: 0.1)")
    momentum: float = option(0.9, "SGD momentum (official code: 0.9)")
    weight_decay: float = option(2e-4, "weight decay (Table 10: 2e-4 ResNet-18, 5e-4 WRN-32-10)")
    lr_milestones: tuple = option((80, 140, 170), "epochs at which the LR decays (Table 10)")
    lr_decay: float = option(0.1, "LR decay factor at each milestone (Table 10: 0.1 ResNet-18, 0.2 WRN)")
    # IAAT (Alg 1 and 2, Table 10)
    eps_w: float = option(8 / PIXEL, "warmup radius eps_w of Alg 1, also the initial eps memory; "
                                     "the fixed radius of --method at (Table 10: 8)", "/255")
    gamma: float = option(1.9 / PIXEL, "discretisation gamma of Alg 2 (Table 10: 1.9)", "/255")
    beta: float = option(0.1, "exponential averaging factor beta of Alg 2 (Table 10: 0.1)")
    warmup: int = option(5, "warmup epochs at uniform eps_w before Alg 2 (Table 10: 5 ResNet-18, "
                            "10 WRN); 0 = the no-warmup ablation (Tables 5-6)")
    eps_init: Optional[float] = option(None, "initial eps memory (default: eps_w)", "/255")
    eps_min: float = option(0.0, "lower clip of the selected eps (ImageNet, Table 11: 4)", "/255")
    eps_max: Optional[float] = option(None, "upper clip of the selected eps (default: none)", "/255")
    line_search: bool = option(False, "exact line search instead of Alg 2 (paper Sec 5.2, Table 7)")
    line_eta: float = option(1.0 / PIXEL, "line search grid step eta (Sec 5.2)", "/255")
    line_max: float = option(16 / PIXEL, "line search largest radius eps_max (Sec 5.2)", "/255")
    # the PGD attack used for training and for selection (Table 10)
    attack_steps: int = option(10, "PGD steps k of the training and selection attacks (Table 10: 10)")
    step_size: float = option(2 / PIXEL, "PGD step size (Table 10: 2)", "/255")
    step_rel: Optional[float] = option(None, "if set, step_i = step_rel * eps_i / attack_steps instead "
                                             "of the fixed step (Madry: 2.5)")
    select_steps: Optional[int] = option(None, "PGD steps of Alg 2's selection attacks (default: "
                                               "--attack-steps; ImageNet, App E.2: a weaker 10)")
    select_step_size: Optional[float] = option(None, "PGD step of the selection attacks (default: "
                                                     "the training attack's step)", "/255")
    attack_bn: str = option("train", "BatchNorm mode of the training attack: train (as PGD-AT and the "
                                     "official code) or eval; selection and TRADES' attack always "
                                     "run in eval mode")
    # beyond the paper: the TRADES loss (Zhang et al. 2019) and a moving average of the weights
    loss: str = option("ce", "training loss of --method iaat: ce (Alg 1 l.11) or trades (TRADES "
                             "at each image's own radius); --method trades implies trades")
    trades_beta: float = option(6.0, "TRADES' beta: the weight of its KL term (TRADES, CIFAR: 6)")
    ema: float = option(0.0, "keep an exponential moving average of the weights with this decay "
                             "(e.g. 0.999; 0: none), warmed up as min(ema, (1+t)/(10+t)) at update t")
    # evaluation at the end of training (the full paper protocol is `iaat eval`)
    eps_test: float = option(8 / PIXEL, "test radius (paper Sec 4: 8)", "/255")
    eval_steps: int = option(20, "PGD steps of the final robust accuracy")
    eval_step_size: float = option(2 / PIXEL, "PGD step size of the evaluations", "/255")
    eval_subset: int = option(1000, "test samples for the per-epoch PGD check (first N of the test set)")
    eval_batch: int = option(500, "batch size of the evaluations")
    # run
    seed: int = option(0, "random seed (model init, data order, augmentation, attack starts)")
    split_seed: int = option(0, "seed of the fixed digits train/test split")
    n_train: Optional[int] = option(None, "use only the first N training images (quick tries)")
    label_noise: float = option(0.0, "fraction of training labels flipped to another class, "
                                     "drawn with --seed (iaat.flip_labels)")
    val_size: int = option(0, "hold out N training images (stratified, fixed by --split-seed), "
                              "never trained on; each epoch's PGD accuracy on them picks best.pt "
                              "(0: none, the paper's protocol evaluates the last epoch)")
    out: Optional[str] = option(None, "run folder (default runs/<dataset>-<model>-<method>-seed<seed>)")
    data_root: str = option("data", "where CIFAR is read from (and downloaded to)")
    download: bool = option(True, "download CIFAR when it is missing")
    device: str = option("auto", "auto (cuda if available), cpu or cuda")
    threads: Optional[int] = option(None, "CPU threads: auto = the cores idle at the start (torch's "
                                          "one per core runs several times slower beside a busy process)")
    save_every: int = option(0, "also checkpoint every N training steps (0: at epoch ends only)")
    plot_every: int = option(10, "rewrite the plots every N epochs (always at the end)")
    # speed: amp changes the arithmetic; the others change no number that matters
    amp: str = option("none", "mixed precision for the training and selection attacks and the "
                              "training step: none (fp32), bf16, or fp16 (loss-scaled input "
                              "gradients, GradScaler for the weights); evaluation is always fp32")
    channels_last: str = option("auto", "NHWC memory layout of model and batches: auto (on for "
                                        "CUDA with --amp, where tensor cores want it), on or off")
    compile: bool = option(False, "torch.compile the model (the first steps compile)")
    cudnn_benchmark: bool = option(True, "let cuDNN time its convolution algorithms (CUDA only)")

    RUNTIME: ClassVar[frozenset] = frozenset({  # may change between a run and its resumption
        "out", "data_root", "download", "device", "threads", "save_every", "plot_every",
        "epochs", "eval_batch", "channels_last", "compile", "cudnn_benchmark"})

# Paper Table 10 for CIFAR. Digits is this project's calibration (README): the paper's ratios
# gamma = step = eps_w / 4 at eps_w = 0.2, the largest radius at which PGD-AT still trains our
# small CNN (at 0.25 and 0.3 it collapses to chance; IAAT does not).
PRESETS = {
    "digits": dict(model="smallcnn", epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4,
                   lr_milestones=(20, 25), lr_decay=0.1, warmup=5, eps_w=0.2, gamma=0.05,
                   step_size=0.05, eps_test=0.2, eval_step_size=0.05, line_eta=0.05, line_max=0.4),
    "resnet18": dict(epochs=200, lr_milestones=(80, 140, 170), lr_decay=0.1, weight_decay=2e-4,
                     warmup=5),
    "wrn32-10": dict(epochs=110, lr_milestones=(70, 90, 100), lr_decay=0.2, weight_decay=5e-4,
                     warmup=10),
}
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = {"dataset": ("digits", "cifar10", "cifar100"), "model": ("smallcnn", "resnet18", "wrn32-10"),
           "method": ("iaat", "at", "trades", "clean"), "loss": ("ce", "trades"),
           "attack_bn": ("train", "eval"), "amp": tuple(AMP),
           "channels_last": ("auto", "on", "off"), "device": ("auto", "cpu", "cuda")}

def uses_trades(cfg: Config) -> bool:
    return cfg.method == "trades" or cfg.loss == "trades"

def loss_name(cfg: Config) -> str:
    return "trades" if uses_trades(cfg) else "ce"

def make_config(dataset: str = "digits", model: Optional[str] = None, **overrides) -> Config:
    """Config for a dataset and model: dataclass defaults < paper preset < explicit overrides."""
    values = dict(PRESETS["digits"]) if dataset == "digits" else {"model": "resnet18"}
    values["model"] = model or values["model"]
    for name, value in (("dataset", dataset), ("model", values["model"])):
        if value not in CHOICES[name]:
            raise IAATError(f"unknown {name} {value!r}; choose from {', '.join(CHOICES[name])}")
    values.update(PRESETS.get(values["model"], {}) if dataset != "digits" else {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return check_config(Config(dataset=dataset, **values))

def check_config(cfg: Config) -> Config:
    """`cfg`, if its settings can be right; else IAATError with a one-line reason."""
    for name, value in ((k, getattr(cfg, k)) for k in cfg.__dataclass_fields__):
        flag = "--" + name.replace("_", "-")
        if name in ("method", "loss", "attack_bn", "amp", "channels_last") and value not in CHOICES[name]:
            raise IAATError(f"{flag} must be one of {', '.join(CHOICES[name])}, not {value!r}")
        if name in _NON_NEGATIVE and value is not None and not 0 <= value < math.inf:
            raise IAATError(f"{flag} must be a finite number >= 0, got "
                            f"{cli_value(name, value)}{'/255' if name in _UNITS else ''}")
        if name in _AT_LEAST and value is not None and value < _AT_LEAST[name]:
            raise IAATError(f"{flag} must be {'>= 0' if _AT_LEAST[name] == 0 else 'positive'}, "
                            f"got {value}")
    for wrong, message in (
            (not 0 < cfg.beta <= 1, f"--beta must be in (0, 1], got {cfg.beta}"),
            (cfg.eps_max is not None and cfg.eps_max < cfg.eps_min, "--eps-max must be >= --eps-min"),
            (not 0 < cfg.lr < math.inf, f"--lr must be a finite number > 0, got {cfg.lr}"),
            (min(cfg.warmup, cfg.save_every) < 0 or (cfg.n_train or 1) < 1,
             "--warmup, --save-every and --n-train must not be negative"),
            (not 0 <= cfg.label_noise < 1, f"--label-noise must be in [0, 1), got {cfg.label_noise}"),
            (cfg.line_search and cfg.line_eta <= 0, "--line-eta must be > 0 with --line-search"),
            (cfg.loss == "trades" and cfg.method != "iaat", "--loss trades is for --method iaat; "
             "--method trades is TRADES at the fixed radius eps_w"),
            (uses_trades(cfg) and cfg.amp == "fp16", "TRADES' KL attack has no fp16 loss scaling: "
             "use --amp bf16 or none"),
            (uses_trades(cfg) and cfg.attack_bn != "train", "--attack-bn does not apply to "
             "TRADES, whose attack runs in eval mode (as trades.py)"),
            (not 0 <= cfg.ema < 1, f"--ema must be in [0, 1), got {cfg.ema}")):
        if wrong:
            raise IAATError(message)
    return cfg

_UNITS = {f.name for f in dataclasses.fields(Config) if f.metadata["unit"]}  # typed as x/255
_NON_NEGATIVE = _UNITS | {"weight_decay", "momentum", "step_rel", "trades_beta"}
_AT_LEAST = dict(dict.fromkeys(("batch_size", "attack_steps", "eval_steps", "eval_batch",
                                 "select_steps", "threads"), 1), epochs=0, eval_subset=0,
                 val_size=0)

def cli_value(name: str, value, unit: Optional[bool] = None) -> str:
    """A value in the CLI's units, as a user types it: '8' for 8/255, '13 17' for a tuple."""
    if isinstance(value, tuple):
        return " ".join(cli_value(name, v, unit) for v in value)
    if isinstance(value, float) and (name in _UNITS if unit is None else unit):
        return f"{value * PIXEL:g}"
    return {"model": "resnet18 on CIFAR", "threads": "auto"}.get(name, "None") if value is None \
        else str(value)

def preset_changes(cfg: Config, skip=Config.RUNTIME) -> list:
    """(name, value) of every setting that differs from the dataset and model's preset."""
    preset = make_config(cfg.dataset, cfg.model, method=cfg.method, seed=cfg.seed)
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(Config)
            if f.name not in skip and getattr(cfg, f.name) != getattr(preset, f.name)]

def run_dir(cfg: Config) -> Path:
    """--out, or runs/<dataset>-<model>-<method>-seed<seed>, plus one tag per setting that
    differs from the preset (e.g. -warmup0), so different commands never share a folder."""
    if cfg.out:
        return Path(cfg.out)
    tags = [(k if v else f"no_{k}") if isinstance(v, bool) else k + ("None" if v is None else
            "_".join(map(str, v)) if isinstance(v, tuple) else cli_value(k, v))
            for k, v in preset_changes(cfg)]
    name = f"{cfg.dataset}-{cfg.model}-{cfg.method}-seed{cfg.seed}" + "".join(f"-{t}" for t in tags)
    if len(name) > 120:  # too many overrides to spell out: a stable short hash instead
        import hashlib
        name = name[:name.index("-seed")] + f"-seed{cfg.seed}-" + \
            hashlib.sha1("".join(tags).encode()).hexdigest()[:10]
    return Path("runs") / name

# ===== Data: whole datasets as uint8 tensors on the device, augmented in batches there ======

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
    augmentation: str  # "cifar" (pad-4 reflect crop + flip) or "digits" (shift <= 1 px, no flip)
    val_x: Optional[torch.Tensor] = None  # --val-size: held out of the training set
    val_y: Optional[torch.Tensor] = None

    def to(self, device) -> "Data":
        return dataclasses.replace(self, **{k: v.to(device) for k, v in vars(self).items()
                                            if torch.is_tensor(v)})

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

def channel_stats(train_x: torch.Tensor) -> tuple:
    """Per-channel mean and std, in [0,1], of the uint8 images trained on (the model's Normalize)."""
    pixels = train_x.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())

def _data_from_numpy(tr_x, tr_y, te_x, te_y, num_classes: int, augmentation: str) -> Data:
    train_x = torch.as_tensor(tr_x, dtype=torch.uint8)
    return Data(train_x, torch.as_tensor(np.asarray(tr_y), dtype=torch.long),
                torch.as_tensor(te_x, dtype=torch.uint8),
                torch.as_tensor(np.asarray(te_y), dtype=torch.long), num_classes,
                *channel_stats(train_x), augmentation)

def load_data(cfg: Config, device) -> Data:
    data = (load_digits(cfg.split_seed) if cfg.dataset == "digits"
            else load_cifar(cfg.dataset, cfg.data_root, cfg.download))
    if cfg.n_train is not None:
        data = dataclasses.replace(data, train_x=data.train_x[:cfg.n_train],
                                   train_y=data.train_y[:cfg.n_train])
    if cfg.val_size:
        data = hold_out(data, cfg.val_size, cfg.split_seed)
    if cfg.n_train is not None or cfg.val_size:  # normalise with the images trained on only
        data = dataclasses.replace(data, **dict(zip(("mean", "std"), channel_stats(data.train_x))))
    if cfg.label_noise:  # the label-noise experiment of notebook 03
        data = dataclasses.replace(data, train_y=flip_labels(data.train_y, data.num_classes,
                                                             cfg.label_noise, cfg.seed))
    return data.to(device)

def hold_out(data: Data, n: int, split_seed: int) -> Data:
    """`data` with n training images, stratified by class and fixed by `split_seed`, moved to
    val_x, val_y (kept in their order): a validation set chosen without the test set."""
    from sklearn.model_selection import train_test_split
    try:
        keep, held = train_test_split(np.arange(len(data.train_y)), test_size=n,
                                      random_state=split_seed, stratify=data.train_y.cpu().numpy())
    except ValueError as err:  # n too small or too large for a stratified split
        raise IAATError(f"--val-size {n} cannot be held out of {len(data.train_y)} training "
                        f"images with every class in both parts: {err}") from None
    keep, held = np.sort(keep), np.sort(held)
    return dataclasses.replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep],
                               val_x=data.train_x[held], val_y=data.train_y[held])

def flip_labels(y: torch.Tensor, num_classes: int, fraction: float, seed: int) -> torch.Tensor:
    """A copy of `y` with round(fraction * len(y)) labels, drawn with `seed`, each replaced by
    another class drawn uniformly (never its own). Drawn on the CPU: the same on any device."""
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    idx = torch.randperm(n, generator=gen)[:round(fraction * n)]
    shift = torch.randint(1, num_classes, (len(idx),), generator=gen)
    out = y.cpu().clone()
    out[idx] = (out[idx] + shift) % num_classes
    return out.to(y.device)

def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(255)

def augment(x_u8: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Batched random crop (+ flip for CIFAR) on the device; returns floats in [0,1].
    CIFAR: reflect-pad 4, random 32x32 crop, horizontal flip (the standard recipe). digits:
    zero-pad 1, random 8x8 crop (a shift of at most a pixel); no flip: a mirrored digit is
    another symbol."""
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

# ===== Models: normalisation lives inside the model, so every eps is in pixel units =========

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
    """BN-ReLU-conv x2 with a 1x1 projection shortcut where the shape changes (He et al. 2016)."""
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
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip

class PreActNet(nn.Module):
    """conv, stages of PreActBlocks (width, stride, blocks), BN-ReLU, global pool, linear."""
    def __init__(self, stages, num_classes: int, in_ch: int, stem: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False)
        blocks, cin = [], stem
        for cout, stride, n in stages:
            for i in range(n):
                blocks.append(PreActBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

def PreActResNet18(num_classes: int = 10, in_ch: int = 3) -> PreActNet:
    """PreAct ResNet-18 (He et al. 2016), the CIFAR 'ResNet-18' of adversarial training papers."""
    return PreActNet([(64, 1, 2), (128, 2, 2), (256, 2, 2), (512, 2, 2)], num_classes, in_ch, 64)

def WideResNet(depth: int = 34, width: int = 10, num_classes: int = 10, in_ch: int = 3):
    """WideResNet (Zagoruyko & Komodakis), (depth - 4) / 6 blocks per stage. The paper's
    "WideResNet-32-10" is Madry et al.'s network, 5 blocks per stage and width 10, which
    Zagoruyko's formula counts as depth 34 (TRADES: WRN-34-10); `wrn32-10` builds that."""
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    return PreActNet([(16 * width, 1, n), (32 * width, 2, n), (64 * width, 2, n)], num_classes,
                     in_ch, 16)

def build_model(name: str, num_classes: int, mean, std) -> nn.Module:
    """Normalize(mean, std) followed by the named network; takes images in [0,1]."""
    nets = {"smallcnn": lambda: SmallCNN(len(mean), num_classes),
            "resnet18": lambda: PreActResNet18(num_classes, len(mean)),
            "wrn32-10": lambda: WideResNet(34, 10, num_classes, len(mean))}
    if name not in nets:
        raise IAATError(f"unknown model {name!r}; choose from {', '.join(nets)}")
    return nn.Sequential(Normalize(mean, std), nets[name]())

# ============================================================================================
# THE CORE: L-inf PGD with a radius per sample, and paper Algorithm 2. Copy from this banner
# to "end of the core" into a file with these imports; it uses no other name of this file:
#   from contextlib import contextmanager; from typing import Callable, Optional
#   import torch; import torch.nn as nn; import torch.nn.functional as F
# fp32, or bf16 under the caller's torch.autocast; fp16: grad_fn=iaat_fp16.fp16_input_grad.
# ============================================================================================

@contextmanager
def model_mode(model: nn.Module, training: bool):
    """Run a block with model.train(training), then give every submodule back its own mode."""
    was = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in was.items():
            m.training = mode

def per_sample(v, x: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as a (B,1,1,1) tensor broadcastable against x."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    v = v.expand(x.shape[0]) if v.dim() == 0 else v
    if v.shape != (x.shape[0],):
        raise ValueError(f"expected a float or a tensor of shape ({x.shape[0]},), got {tuple(v.shape)}")
    return v.view(-1, *([1] * (x.dim() - 1)))

def step_per_sample(step_size, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The per-sample step: a float, a (B,) tensor, or a rule applied to the per-sample eps."""
    return per_sample(step_size(eps.flatten()) if callable(step_size) else step_size, x)

def ball(x, eps) -> tuple:
    """The L-inf ball around x within [0,1] as a box [lo, hi]: each projection is one clamp."""
    return (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)

def uniform_start(x, eps):
    """Uniform in the eps-ball, clamped to [0,1] (the official code does not clamp)."""
    return (x + (torch.rand_like(x) * 2 - 1) * eps).clamp_(0, 1)

def input_grad(model, x_adv, y, targeted: bool = False, state=None):
    """(logits, d(summed cross-entropy)/d(input), state), with no parameter .grad: the attacks'
    grad_fn. `state` goes from step to step (fp16_input_grad keeps its loss scale there)."""
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        grad, = torch.autograd.grad(-loss if targeted else loss, x_adv)
        return logits.detach(), grad, state

def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, *, steps: int = 10,
               step_size=2 / 255, random_start: bool = True, targeted: bool = False,
               restarts: int = 1, grad_fn: Optional[Callable] = None) -> torch.Tensor:
    """L-inf PGD (Madry et al.) with a radius and a step per sample: PGD_k(x, y, eps_i) of Alg 1.

    eps, step_size: floats or (B,) tensors (step_size may be a function of eps). The result
    lies in [0,1] with |x_adv_i - x_i|_inf <= eps_i (eps_i = 0 returns x_i). `targeted` moves
    towards `y`. With `restarts` each sample keeps its worst case: the first restart that
    succeeds, else the highest loss. Uses the model's mode as found; input gradients only."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    x, eps = x.detach(), per_sample(eps, x)  # the result is data, not part of any graph
    step, (lo, hi) = step_per_sample(step_size, eps, x), ball(x, eps)
    best = best_win = best_obj = None
    for _ in range(restarts):
        x_adv, state = uniform_start(x, eps) if random_start else x.clone(), None
        for _ in range(steps):  # x_{t+1} = Proj(x_t + step * sign(grad))
            _, grad, state = (grad_fn or input_grad)(model, x_adv, y, targeted, state)
            x_adv = torch.clamp(x_adv + step * grad.sign(), lo, hi)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            logits = model(x_adv)
        win = (logits.argmax(1) == y) == targeted  # targeted: hit y; untargeted: leave it
        obj = F.cross_entropy(logits, y, reduction="none") * (-1 if targeted else 1)
        if best is None:
            best, best_win, best_obj = x_adv, win, obj
            continue
        new = ~best_win & (win | (obj > best_obj))
        best = torch.where(per_sample(new, x).bool(), x_adv, best)
        best_win, best_obj = best_win | win, torch.where(new, obj, best_obj)
    return best

@contextmanager
def cudnn_benchmark_off():
    """Off in pgd_fooled, whose batch shrinks: cuDNN would time every new size (GPU: 8-25x)."""
    was, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was

@cudnn_benchmark_off()
def pgd_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, *, steps: int = 10,
               step_size=2 / 255, early_exit: bool = True,
               grad_fn: Optional[Callable] = None) -> torch.Tensor:
    """Does PGD at eps_i find an image of another class? (B,) bool, the test of Alg 2 l.4 and 6.

    Fooled: some iterate x_0..x_k is misclassified (the paper's "PGD succeeded in finding an
    image with a different class label"); with `early_exit` it then leaves the attack (eval mode)."""
    x, eps = x.detach(), per_sample(eps, x)
    step = step_per_sample(step_size, eps, x)
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    alive = torch.arange(len(x), device=x.device)  # the samples still attacked
    x_adv, state, (lo, hi) = uniform_start(x, eps), None, ball(x, eps)
    for t in range(steps + 1):
        if t == steps:
            with torch.no_grad():
                logits = model(x_adv)
        else:
            logits, grad, state = (grad_fn or input_grad)(model, x_adv, y, False, state)
        hit = logits.argmax(1) != y
        fooled[alive] = fooled[alive] | hit
        if t == steps:
            break
        x_adv = torch.clamp(x_adv + step * grad.sign(), lo, hi)
        if early_exit:  # one host sync per step: how many samples stay
            keep = (~hit).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            if len(keep) < len(alive):
                alive, x_adv, y, lo, hi, step = (v.index_select(0, keep)
                                                 for v in (alive, x_adv, y, lo, hi, step))
    return fooled

def select_epsilon(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_prev: torch.Tensor, *,
                   gamma: float, beta: float, steps: int = 10, step_size=2 / 255,
                   eps_min: float = 0.0, eps_max: Optional[float] = None,
                   grad_fn: Optional[Callable] = None) -> torch.Tensor:
    """Paper Algorithm 2: the new radius eps_i of each sample, shape (B,).

    l.1-3   candidates prev + gamma, prev, prev - gamma, with prev = mem[i] (`eps_prev`)
    l.4-5   if PGD at prev + gamma keeps the label y_i: choose prev + gamma
    l.6-7   elif PGD at prev keeps it: choose prev (attacked only on the samples fooled at l.4)
    l.8-9   else: choose prev - gamma, clipped at 0
    l.11    eps_i = (1 - beta) * prev + beta * chosen, then clipped to [eps_min, eps_max]
    The caller stores eps_i as mem[i] (l.12). Both attacks are measurements: they run in eval
    mode and leave BatchNorm statistics and the model's mode alone."""
    prev = eps_prev.to(x.device, x.dtype)
    with model_mode(model, False):
        chosen = prev + gamma
        kw = dict(steps=steps, grad_fn=grad_fn)
        sub = pgd_fooled(model, x, y, chosen, step_size=step_size, **kw).nonzero().squeeze(1)
        if len(sub):  # a (B,) tensor step follows its samples
            step = step_size[sub] if torch.is_tensor(step_size) and step_size.dim() else step_size
            prev_fooled = pgd_fooled(model, x[sub], y[sub], prev[sub], step_size=step, **kw)
            chosen[sub] = torch.where(prev_fooled, prev[sub] - gamma, prev[sub])
    eps = (1 - beta) * prev + beta * chosen.clamp(min=0)
    return eps.clamp(min=eps_min, max=eps_max)

# ------------------------------------- end of the core --------------------------------------

# ============================================================================================
# THE TRADES LOSS (Zhang et al. 2019; yaodongyu/TRADES, trades.py) with a radius per sample.
# Copy from this banner to "end of the TRADES loss"; it needs torch, nn and F, as the core.
# ============================================================================================

def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """KL(p(x) || p(x')) summed over the batch, as trades.py's nn.KLDivLoss(size_average=False)."""
    return F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_clean.float(), 1),
                    reduction="sum")

def trades_attack(model: nn.Module, x: torch.Tensor, eps, *, steps: int = 10,
                  step_size=2 / 255) -> torch.Tensor:
    """TRADES' inner maximisation, as trades.py: from x + 0.001 N(0, I) (not projected before
    the first step), sign steps on trades_kl, each followed by the projection to [0,1] and
    within eps_i of x_i (eps, step_size: floats, (B,) tensors, or a rule of eps for the step);
    eps_i = 0 returns x_i. Call it in eval mode, as trades.py does; the clean prediction is
    computed once (trades.py recomputes it every step: the same in eval mode)."""
    x = x.detach()
    col = lambda v: torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(len(x)).view(
        -1, *([1] * (x.dim() - 1)))
    eps = col(eps)
    step = col(step_size(eps.flatten()) if callable(step_size) else step_size)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    with torch.no_grad():
        logits_clean = model(x)
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(trades_kl(model(x_adv), logits_clean), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), lo), hi)
    return torch.min(torch.max(x_adv, lo), hi)  # a no-op after a step; steps = 0 projects too

def trades_loss(model: nn.Module, x, x_adv, y, beta: float = 6.0) -> tuple:
    """TRADES' outer loss, in train mode: CE(f(x), y) + beta * KL(p(x) || p(x')) / B (the
    `batchmean` reduction); the gradient flows through both predictions, as in trades.py.
    trades.py passes x through the model twice, for each term; in train mode both give the
    same logits, so the second pass runs without a graph, for its BatchNorm statistics only
    (in trades.py's order: x, x', x). Returns (loss, logits of x_adv)."""
    logits, logits_adv = model(x), model(x_adv)
    with torch.no_grad():
        model(x)
    return (F.cross_entropy(logits.float(), y) + beta * trades_kl(logits_adv, logits) / len(x),
            logits_adv)

# ---------------------------------- end of the TRADES loss ----------------------------------

# ===== Algorithm 1: one training step (and the PGD-AT and clean baselines) ==================

Step = Union[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]  # a step per sample

def line_search_epsilon(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eta: float,
                        eps_max: float, steps: int = 10, step_size: Step = 2 / PIXEL,
                        eps_min: float = 0.0, grad_fn: Optional[Callable] = None) -> torch.Tensor:
    """Exact line search (paper Sec 5.2, Table 7), in place of Alg 2: the largest eps in
    {eta, 2 eta, ..., eps_max} at which PGD does not fool the model (0 if none), clipped
    below at eps_min; no memory, no averaging, eval mode. Scanned from the top down."""
    eps = torch.zeros(len(x), device=x.device)
    todo = torch.arange(len(x), device=x.device)
    with model_mode(model, False):
        for k in range(int(eps_max / eta + 1e-6), 0, -1):
            if not len(todo):
                break
            step = step_size[todo] if torch.is_tensor(step_size) and step_size.dim() else step_size
            fooled = pgd_fooled(model, x[todo], y[todo], k * eta, steps=steps, step_size=step,
                                grad_fn=grad_fn)
            eps[todo[~fooled]] = k * eta
            todo = todo[fooled]
    return eps.clamp(min=eps_min)

def attack_settings(cfg: Config, steps: Optional[int] = None) -> dict:
    """steps, step_size and grad_fn of the training attack (Table 10: a fixed step, or
    step_rel * eps_i / k), or of another attack with `steps`; fp16: loss-scaled gradients."""
    steps = steps or cfg.attack_steps
    step = cfg.step_size if cfg.step_rel is None else lambda eps: cfg.step_rel * eps / steps
    grad_fn = fp16_input_grad if cfg.amp == "fp16" else None
    return {"steps": steps, "step_size": step, "grad_fn": grad_fn}

def choose_epsilon(model, x, y, idx, mem: torch.Tensor, epoch: int, cfg: Config) -> torch.Tensor:
    """Alg 1 l.3-6: eps_w in warmup, otherwise Alg 2 (or the line search); updates mem[idx].
    Alg 2's attack is the training attack's, unless --select-steps / --select-step-size make
    it weaker (ImageNet: PGD-10 selects, PGD-30 trains)."""
    if epoch < cfg.warmup:
        return torch.full_like(mem[idx], cfg.eps_w)
    kw = attack_settings(cfg, cfg.select_steps)
    kw.update({} if cfg.select_step_size is None else {"step_size": cfg.select_step_size})
    if cfg.line_search:
        eps = line_search_epsilon(model, x, y, eta=cfg.line_eta, eps_max=cfg.line_max,
                                  eps_min=cfg.eps_min, **kw)
    else:
        eps = select_epsilon(model, x, y, mem[idx], gamma=cfg.gamma, beta=cfg.beta,
                             eps_min=cfg.eps_min, eps_max=cfg.eps_max, **kw)
    mem[idx] = eps
    return eps

def clean_correct(model, x, y) -> torch.Tensor:
    """Alg 1 l.9-10: S+ = samples classified correctly on the clean input (eval mode)."""
    with torch.no_grad(), model_mode(model, False):
        return model(x).argmax(1) == y

def training_inputs(model, x, y, eps: torch.Tensor, correct: torch.Tensor, cfg: Config):
    """Alg 1 l.8-11 as one batch: x_adv_i (PGD at eps_i, l.8) for S+, the clean x_i for S-.
    Attacking with eps_i = 0 for S- returns those x_i unchanged, so the mean cross-entropy of
    this batch is exactly the loss of Alg 1 l.11. With the TRADES loss, x_adv_i is TRADES' KL
    attack at eps_i (eval mode, as trades.py): S- images get x'_i = x_i, a KL term near 0."""
    if uses_trades(cfg):
        with model_mode(model, False):
            kw = attack_settings(cfg)
            return trades_attack(model, x, eps * correct, steps=kw["steps"],
                                 step_size=kw["step_size"])
    with model_mode(model, cfg.attack_bn == "train"):
        return pgd_attack(model, x, y, eps * correct, **attack_settings(cfg))

@dataclass
class TrainState:
    """Everything a run carries from step to step; a checkpoint holds all of it."""
    model: nn.Module      # the network; its state_dict is what checkpoints hold
    compiled: nn.Module   # torch.compile(model) with --compile, else the model: the attacks call it
    ddp: nn.Module        # DistributedDataParallel(model) under torchrun (compiled with --compile),
                          # else `compiled`: the SGD step calls it
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # fp16 only; disabled otherwise
    mem: torch.Tensor     # eps_i of every training image: Alg 2's memory, keyed by index
    visits: torch.Tensor  # how many times Alg 2 updated each image
    epoch: int = 0        # epochs done
    step: int = 0         # steps done in the current epoch
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None  # --ema: the weight average

def train_step(s: TrainState, x, y, idx, cfg: Config) -> dict:
    """One SGD step of IAAT (Alg 1), PGD-AT or TRADES (everyone in S+ at eps_w) or clean
    training at epoch s.epoch, all under --amp's autocast, then the weight average's update
    (--ema); returns the step's sums as tensors."""
    with autocast(cfg, x.device):
        correct = (clean_correct(s.compiled, x, y) if cfg.method == "iaat"
                   else torch.ones_like(y, dtype=torch.bool))
        eps = (choose_epsilon(s.compiled, x, y, idx, s.mem, s.epoch, cfg) if cfg.method == "iaat"
               else torch.full_like(s.mem[idx], 0.0 if cfg.method == "clean" else cfg.eps_w))
        x_in = x if cfg.method == "clean" else training_inputs(s.compiled, x, y, eps, correct, cfg)
        s.compiled.train()
        if uses_trades(cfg):
            loss, logits = trades_loss(s.ddp, x, x_in, y, cfg.trades_beta)
        else:
            logits = s.ddp(x_in)
            loss = F.cross_entropy(logits.float(), y)
    optimizer_step(s.opt, loss, s.scaler)
    if s.ema is not None:
        s.ema.update_parameters(s.model)
    with torch.no_grad():
        stats = {"loss": loss.detach() * len(y), "train_acc": (logits.argmax(1) == y).sum(),
                 "eps": eps.sum(), "n": torch.tensor(len(y), device=y.device)}
        return dict(stats, clean_acc=correct.sum()) if cfg.method == "iaat" else stats

def optimizer_step(opt, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
    """Backward and SGD step through the GradScaler: loss-scaled under fp16; a disabled scaler
    (every other --amp) passes the loss and the step through unchanged."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()

def autocast(cfg: Config, device: torch.device):
    """torch.autocast in --amp's dtype (disabled for none). The attacks inside run in it too."""
    return torch.autocast(device.type, dtype=AMP[cfg.amp], enabled=AMP[cfg.amp] is not None)

def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's AveragedModel of the weights and BatchNorm statistics: its first update copies
    the model; the update after t >= 1 earlier ones moves the average by 1 - d towards it,
    d = min(decay, (1+t)/(10+t)) (the usual warm-up: no hold on the first random weights)."""
    def update(avg: list, new: list, _) -> None:  # lists of one dtype
        t = int(average.n_averaged)  # its CPU counter: no wait for the GPU
        d = min(decay, (1 + t) / (10 + t))
        for a, b in zip(avg, new):
            a.lerp_(b, 1 - d) if a.is_floating_point() else a.copy_(b)  # ints: BN's count
    average = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    return average

def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda"
                                         and cfg.amp != "none")

def make_state(model: nn.Module, cfg: Config, n: int, opt=None, sched=None) -> TrainState:
    """A fresh run's state: the model with the speed settings (cuDNN autotuning, channels_last,
    torch.compile with dynamic shapes for the selection's shrinking batches), DDP under torchrun,
    SGD with the step schedule (or `opt`, `sched`), the fp16 GradScaler, eps memory at eps_init."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if uses_channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    compiled = ddp = torch.compile(model, dynamic=True) if cfg.compile else model
    if current_dist().world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp = torch.compile(ddp) if cfg.compile else ddp
    if opt is None:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_milestones), cfg.lr_decay)
    eps_init = cfg.eps_w if cfg.eps_init is None else cfg.eps_init
    return TrainState(model, compiled, ddp, opt, sched,
                      torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
                      torch.full((n,), eps_init, device=device),
                      torch.zeros(n, dtype=torch.int32, device=device),
                      ema=weight_average(model, cfg.ema) if cfg.ema else None)

# ===== torchrun: shards of each global batch, one consistent eps memory ====================

def shard(chunk: torch.Tensor, d: Dist) -> torch.Tensor:
    """This process's part of a global batch: contiguous, disjoint, sizes differ by at most
    one, so the per-process batch is global batch / world and every index is visited once."""
    return chunk.tensor_split(d.world)[d.rank]

def sync_memory(mem: torch.Tensor, visits: torch.Tensor, idx: torch.Tensor, width: int) -> None:
    """After a step each process has written eps for its own samples `idx` into its copy of
    the memory. All-gather the (index, eps) pairs, padded to `width` (>= any process's count),
    so that every copy holds every update; count the updates of each sample in `visits`."""
    d = current_dist()
    if d.world > 1:
        ids = torch.full((width,), -1, dtype=torch.long, device=mem.device)
        ids[:len(idx)] = idx
        vals = torch.zeros(width, device=mem.device)
        vals[:len(idx)] = mem[idx]
        all_ids, all_vals = ([torch.empty_like(t) for _ in range(d.world)] for t in (ids, vals))
        torch.distributed.all_gather(all_ids, ids)
        torch.distributed.all_gather(all_vals, vals)
        ids, vals = torch.cat(all_ids), torch.cat(all_vals)
        idx = ids[ids >= 0]  # without the padding
        mem[idx] = vals[ids >= 0]
    visits.index_add_(0, idx, torch.ones_like(idx, dtype=visits.dtype))

def sync_buffers(*models: Optional[nn.Module]) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics, also the weight average's):
    each process updated them on its own shard; the evaluated and saved model must be one."""
    for b in (b for m in models if m is not None for b in m.buffers()) \
            if current_dist().world > 1 else ():
        torch.distributed.broadcast(b, 0)

# ===== The training loop: Alg 1 over epochs, with checkpoints, resume and SIGTERM ===========

def train(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Train one run into run_dir(cfg), resuming if its checkpoint exists; return the summary.
    Writes checkpoint.pt (best.pt with --val-size), metrics.jsonl, eps_history.npy, config.json,
    summary.json and the plots; IAATError on bad input or a non-finite loss. Under torchrun
    every process runs this on its shard of every global batch; rank 0 alone logs and writes."""
    d = current_dist()
    log = log if d.main else (lambda msg: None)
    out = run_dir(cfg)
    ckpt = open_run(out, cfg)
    device = pick_device(cfg.device, d.local_rank)
    if ckpt is not None and ckpt["device"] != device.type:
        raise IAATError(f"checkpoint {out / 'checkpoint.pt'} was written on {ckpt['device']}, this "
                        f"run is on {device.type}; resume on {ckpt['device']} (--device) for the "
                        "same result")
    with local_rank_zero_first():  # it downloads; the others then read its files
        data = load_data(cfg, device)
    n, bs = len(data.train_y), cfg.batch_size
    if bs < d.world:
        raise IAATError(f"--batch-size {bs} is smaller than the {d.world} processes")
    if 0 < n % bs < d.world:
        raise IAATError(f"the last batch of each epoch ({n % bs} images) cannot be shared by "
                        f"{d.world} processes; choose another --batch-size")
    saved = ckpt["config"].get("threads", TORCH_THREADS) if ckpt else None  # none saved: default
    cfg = dataclasses.replace(cfg, threads=set_threads(cfg.threads, saved, log))
    torch.manual_seed(cfg.seed)
    s = make_state(build_model(cfg.model, data.num_classes, data.mean, data.std).to(device), cfg, n)
    totals = restore(ckpt, out / "checkpoint.pt", s) if ckpt is not None else {}
    layout = torch.channels_last if uses_channels_last(cfg, device) else torch.contiguous_format

    def batches(epoch: int, start: int):
        """The epoch's (x, y, idx) from step `start`, and its data generator: the permutation
        is the same on every process; rank 0 continues its generator (restored mid-epoch),
        the others draw their own augmentation."""
        gen = epoch_generator(cfg.seed, epoch, device)
        perm = torch.randperm(n, generator=gen, device=device)
        if d.rank > 0:
            gen = epoch_generator(rank_seed(cfg.seed, d.rank), epoch, device)
        elif start:
            gen.set_state(ckpt["rng"]["data"])

        def stream():
            for chunk in perm.split(bs)[start:]:  # a global batch, then this process's shard
                idx = shard(chunk, d)
                x = augment(data.train_x[idx], data.augmentation, gen)
                yield x.contiguous(memory_format=layout), data.train_y[idx], idx
        return stream(), gen

    checks = {"val": (data.val_x, data.val_y),
              "test": (data.test_x[:cfg.eval_subset], data.test_y[:cfg.eval_subset])}

    def accuracies() -> dict:  # every epoch: PGD on the held-out and the first eval_subset test images
        row = {}
        for name, (x, y) in checks.items():
            if x is not None and len(y):
                acc = evaluate(s.model, x, y, eps=cfg.eps_test, steps=cfg.attack_steps,
                               step_size=cfg.eval_step_size, batch_size=cfg.eval_batch,
                               distributed=True)
                row.update({f"{name}_clean": acc["clean"], f"{name}_pgd": acc["robust"]})
        return row
    rows, _ = train_loop(cfg, s, out, totals, batches, math.ceil(n / bs),
                         math.ceil(bs / d.world), log, epoch_eval=accuracies)
    return finish(cfg, s, data, out, rows, log)

def train_loop(cfg: Config, s: TrainState, out: Path, totals: dict, batches: Callable,
               steps_per_epoch: int, shard_size: int, log: Callable[[str], None], *,
               epoch_eval: Optional[Callable[[], dict]] = None, on_step: Optional[Callable] = None,
               lr_per_step: bool = False, history_dtype=np.float32) -> tuple:
    """Alg 1 from s.epoch, s.step to cfg.epochs, on every process; returns (metrics rows, eps
    history). `batches(epoch, start)`: the epoch's (x, y, idx) from step `start`, and its data
    generator (saved mid-epoch); `totals`: the epoch's sums so far; `shard_size` >= each
    process's images per step. Each epoch: train, check (its metrics row, plus `epoch_eval()`),
    log, write (eps history, metrics, plots, checkpoint), keep the best. `on_step(s, sums)` runs
    after each step (ImageNet logs); the LR steps per epoch, or per step with `lr_per_step`."""
    from tqdm import tqdm  # the plain bar: silent outside a terminal, notebooks included
    d, device, ckpt_path = current_dist(), s.mem.device, out / "checkpoint.pt"
    if d.rank > 0:  # its own attack starts, drawn anew at each (re)start: ranks never share noise
        torch.manual_seed(rank_seed(cfg.seed, d.rank) + 104729 * (s.epoch * 100_003 + s.step))
    rows, history, lock = open_folder(cfg, s, out, log, history_dtype)
    totals = totals if d.main else {}  # the saved totals are counted on rank 0

    def train_epoch(totals: dict, t0: float, sigterm) -> dict:
        """Alg 1 on each batch of epoch s.epoch from step s.step; mid-epoch checkpoints every
        --save-every steps, and on SIGTERM (saved, then SystemExit). The epoch's totals."""
        sums = {k: torch.tensor(v, device=device) for k, v in totals.items() if k != "time"}
        stream, gen = batches(s.epoch, s.step)
        bar = tqdm(desc=f"epoch {s.epoch + 1}/{cfg.epochs}", total=steps_per_epoch,
                   initial=s.step, leave=False, disable=None if d.main else True)
        for x, y, idx in stream:
            for k, v in train_step(s, x, y, idx, cfg).items():
                sums[k] = sums.get(k, 0) + v
            if lr_per_step:
                s.sched.step()
            if cfg.method == "iaat" and s.epoch >= cfg.warmup:
                sync_memory(s.mem, s.visits, idx, shard_size)
            s.step += 1
            bar.update()
            if on_step is not None:
                on_step(s, sums)
            stop = any_process(sigterm.requested, device)
            if s.step < steps_per_epoch and (
                    stop or (cfg.save_every and s.step % cfg.save_every == 0)):
                totals = reduce_and_check_totals(sums, s, ckpt_path)
                if d.main:
                    save_checkpoint(ckpt_path, cfg, s, dict(totals, time=time.time() - t0), gen)
                if stop:
                    raise SystemExit(stopped(s.epoch, s.step, out, log))
        bar.close()
        return reduce_and_check_totals(sums, s, ckpt_path)

    with sigterm_flag() as sigterm, lock or nullcontext():  # the lock is a file: closed after
        while s.epoch < cfg.epochs:
            t0 = time.time() - totals.get("time", 0.0)
            totals = train_epoch(totals, t0, sigterm)                       # train
            if not lr_per_step:
                s.sched.step()
            s.epoch, s.step = s.epoch + 1, 0
            sync_buffers(s.model, s.ema.module if s.ema is not None else None)
            if cfg.method != "iaat":  # the radius each image was trained at, for the history
                s.mem.fill_(0.0 if cfg.method == "clean" else cfg.eps_w)
            rows.append(epoch_row(s, totals, time.time() - t0, epoch_eval))  # check
            totals = {}
            log(format_row(rows[-1], cfg))                                  # log
            if d.main:                                                      # write, keep best
                history = np.concatenate([history, s.mem.cpu().numpy()[None].astype(history.dtype)])
                write_eps_history(out / "eps_history.npy", history)
                write_metrics(out / "metrics.jsonl", rows)
                if s.epoch == cfg.epochs or (cfg.plot_every and s.epoch % cfg.plot_every == 0):
                    plot_run(out, rows, history, cfg.warmup)  # curves, eps_hist, eps_mean.png
                save_checkpoint(ckpt_path, cfg, s, {})
                keep_best(out, rows)
            if any_process(sigterm.requested, device):
                raise SystemExit(stopped(s.epoch, s.step, out, log))
    return rows, history

def rank_seed(seed: int, rank: int) -> int:  # primes: no two ranks, epochs or steps share a seed
    """The seed of rank > 0's augmentation; its attack starts add the (re)start's epoch and step."""
    return seed + 7919 * rank

def epoch_row(s: TrainState, sums: dict, seconds: float, epoch_eval=None) -> dict:
    """The metrics of the epoch just done: its sums as means, then `epoch_eval()`."""
    n = sums["n"]
    row = {"epoch": s.epoch, "images": int(n), "lr": s.opt.param_groups[0]["lr"],
           "train_loss": sums["loss"] / n, "train_acc": sums["train_acc"] / n,
           "eps_mean": sums["eps"] / n}
    row.update({"train_clean_acc": sums["clean_acc"] / n} if "clean_acc" in sums else {})
    row.update(epoch_eval() if epoch_eval else {})
    return dict(row, seconds=round(seconds, 2), images_per_second=round(n / seconds, 2))

def format_row(r: dict, cfg: Config) -> str:
    s = (f"epoch {r['epoch']:3d}/{cfg.epochs} | loss {r['train_loss']:.3f} | train acc "
         f"{r['train_acc']:.3f} | eps {r['eps_mean'] * PIXEL:5.1f}/255")
    s += "".join(f" | {k} clean {r[k + '_clean']:.3f} PGD-{cfg.attack_steps} {r[k + '_pgd']:.3f}"
                 for k in ("val", "test") if k + "_clean" in r)
    return s + f" | {r['seconds']:.1f}s"

# ===== The end-of-training evaluation: natural and PGD accuracy on the test set =============

def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
             step_size: float, restarts: int = 1, batch_size: int = 500,
             distributed: bool = False) -> dict:
    """Natural and PGD accuracy (robust: correct clean and attacked), eval mode, FP32. With
    `distributed` (every process of a torchrun job must call it then), each process takes a shard
    of the examples and the counts are summed over processes, never a mean of per-process means."""
    mine = shard(torch.arange(len(y), device=y.device), current_dist() if distributed else Dist())
    counts = torch.zeros(2, device=y.device)  # correct clean, correct under attack
    with model_mode(model, False):
        for batch in mine.split(batch_size):
            x, t = to_float(x_u8[batch]), y[batch]
            with torch.no_grad():
                ok = model(x).argmax(1) == t  # robust: correct clean and under the attack
            x_adv = pgd_attack(model, x, t, eps, steps=steps, step_size=step_size,
                               restarts=restarts)
            with torch.no_grad():
                counts += torch.stack([ok.sum(), (ok & (model(x_adv).argmax(1) == t)).sum()])
    clean, robust = (all_sum(counts) if distributed else counts).tolist()
    return {"clean": clean / len(y), "robust": robust / len(y)}

def state_hashes(s: TrainState) -> tuple:
    """SHA-1s of every process's eps memory and model (and weight average); IAATError if the
    processes differ."""
    models = [*s.model.state_dict().values(),
              *(s.ema.module.state_dict().values() if s.ema is not None else ())]
    return agreement({"eps memories": [s.mem], "models (weights and BN statistics)": models})

def finish(cfg: Config, s: TrainState, data: Data, out: Path, rows: list, log) -> dict:
    """Natural and PGD-20 accuracy on the whole test set at eps_test, summary.json and a line;
    checks that every process ended with the same eps memory and model, and that every image
    was selected once per epoch after warmup."""
    kw = dict(eps=cfg.eps_test, steps=cfg.eval_steps, step_size=cfg.eval_step_size,
              batch_size=cfg.eval_batch, distributed=True)
    acc = evaluate(s.model, data.test_x, data.test_y, **kw)
    ema = evaluate(s.ema.module, data.test_x, data.test_y, **kw) if s.ema is not None else {}
    mems, models = state_hashes(s)
    best = best_row(rows)
    expected = max(0, rows[-1]["epoch"] - cfg.warmup) if cfg.method == "iaat" and rows else 0
    if rows and not bool((s.visits == expected).all()):
        raise IAATError(f"some images were not selected exactly once per epoch after warmup "
                        f"(updates per image {int(s.visits.min())}-{int(s.visits.max())}, "
                        f"expected {expected})")
    summary = {"run": str(out), "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method,
               "loss": loss_name(cfg), "ema": cfg.ema, "seed": cfg.seed,
               "epochs": cfg.epochs, "natural_acc": acc["clean"],
               "pgd_acc": acc["robust"], "pgd": f"PGD-{cfg.eval_steps}",
               "eps_test_255": cfg.eps_test * PIXEL,
               "eps_mean_255": float(s.mem.double().mean() * PIXEL) if rows else None,
               "eps_updates_per_sample": [int(s.visits.min()), int(s.visits.max())],
               "processes": current_dist().world, "threads": cfg.threads,
               "eps_memory_sha1_per_process": mems, "model_sha1_per_process": models,
               "train_seconds": round(sum(r["seconds"] for r in rows), 1),
               "best_epoch": best.get("epoch"), "best_val_pgd": best.get("val_pgd"),
               **({"ema_natural_acc": ema["clean"], "ema_pgd_acc": ema["robust"]} if ema else {})}
    if current_dist().main:
        write_json(out / "summary.json", summary)
    ema_text = f" | EMA natural {ema['clean']:.4f} PGD {ema['robust']:.4f}" if ema else ""
    log(f"final {cfg.dataset} {cfg.model} {cfg.method} seed {cfg.seed}: natural "
        f"{acc['clean']:.4f} | PGD-{cfg.eval_steps} at {cfg.eps_test * PIXEL:g}/255 "
        f"{acc['robust']:.4f}{ema_text} | mean eps {summary['eps_mean_255'] or 0:.1f}/255 | "
        f"{summary['train_seconds']:.0f}s training | {out}")
    return summary

# ===== CLI: `python iaat.py [flags]` trains; `python iaat.py eval RUN` evaluates (iaat_eval.py) ===

def add_config_flags(p: argparse.ArgumentParser, cls=Config, presets=PRESETS, skip=(),
                     choices=None, aliases=None) -> None:
    """One flag per field of `cls` (Config or a subclass), its help with unit, paper source and
    default (the preset's, where one sets it); a flag not given stays None (the preset decides)."""
    add_dataclass_flags(p, cls, presets, cli_value, skip=skip, choices={**CHOICES, **(choices or {})},
                        aliases={"eps_w": ["--eps"], **(aliases or {})})

def config_from_args(argv) -> Config:
    """The Config of `python iaat.py ARGV`; the CLI is built from Config, a flag per field."""
    presets = "\n".join(f"  {k}: " + ", ".join(f"{f}={cli_value(f, v)}" for f, v in p.items())
                        for k, p in PRESETS.items())
    parser = CLIParser(prog="iaat", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"presets (override any with its flag):\n{presets}\n\nevaluate a "
                              "trained run with the paper's protocol: iaat eval RUN_DIR (see iaat "
                              "eval --help)")
    add_config_flags(parser)
    values = dataclass_values(parser.parse_args(argv), Config, PIXEL)  # /255 flags divided
    return make_config(values.pop("dataset") or "digits", values.pop("model"), **values)

def main(argv=None) -> int:
    """`python iaat.py [flags]`: train (or resume) one run and print its final summary;
    `python iaat.py eval RUN_DIR [flags]`: the paper's evaluation protocol on a trained run;
    `python iaat.py rank RUN_DIR`: its training images by final radius, as a CSV;
    `python iaat.py export RUN_DIR OUT`: its checkpoint in RobustBench's formats."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["eval"], ["rank"], ["export"]):  # the only imports from modules above
        import iaat_eval, iaat_export, iaat_radius  # noqa: E401 (this file's)
        handed = {"eval": iaat_eval, "rank": iaat_radius, "export": iaat_export}
        return handed[argv[0]].main(argv[1:])
    try:
        cfg = config_from_args(argv)
        with process_group(pick_device(cfg.device)):
            train(cfg)
    except (IAATError, OSError) as err:  # OSError: full disk, no permission, --out a file, ...
        print(f"iaat: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("iaat: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0

if __name__ == "__main__":
    exit_process(main())
