"""IAAT on ImageNet with torchrun: the paper's Table 11 recipe (Sec 4.2, App E.2).

One process per GPU; every setting is a flag (python imagenet/train.py --help):

    torchrun --standalone --nproc_per_node=8 imagenet/train.py --data /path/to/imagenet \\
        --arch resnet50                              # IAAT, Table 11 (32 images per GPU)
    torchrun ... imagenet/train.py --data ... --method at      # PGD-AT at 16/255 (Xie et al.)
    torchrun ... imagenet/train.py --data ... --method clean
    torchrun --nnodes=8 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=iaat50 imagenet/train.py --data ... --arch resnet50      # 64 GPUs

The algorithm is iaat.py's, imported, not copied: `iaat.train_step` runs Alg 1 with Alg 2's
radius selection, under autocast fp16 with a loss scaled before each input gradient
(`iaat._input_grad`). This file adds what ImageNet needs around it: ImageFolder loaders with
a DistributedSampler, torchvision ResNets, the Goyal et al. LR schedule, SyncBatchNorm,
checkpoints that survive SIGTERM, and the Sec 4.2 evaluation (natural top-1, random-targeted
PGD at eps 4/8/12/16 in FP32, ImageNet-C mCE). Rerunning a command resumes its run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iaat  # noqa: E402  (the repository's iaat.py, also when run as a script)
from iaat import PIXEL, IAATError, _opt  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet statistics
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# ============================================================================================
# Settings: paper Table 11 and App E.2
# ============================================================================================

@dataclass
class ImageNetConfig:
    """Every setting of an ImageNet run; /255 fields are entered in 0-255 units on the CLI."""
    data: str = _opt("", "ImageNet root holding train/ and val/ class folders (ImageFolder)")
    arch: str = _opt("resnet50", "torchvision ResNet: " + ", ".join(ARCHS))
    method: str = _opt("iaat", "iaat, at (PGD-AT at eps_w, Xie et al.) or clean")
    epochs: int = _opt(110, "training epochs (Table 11: 110)")
    batch_size: int = _opt(32, "images per process (Table 11: 32 per GPU)")
    lr: Optional[float] = _opt(None, "peak LR (Table 11: 0.1 x global batch / 256)")
    lr_warmup: int = _opt(5, "epochs of linear LR warmup (Goyal et al.)")
    lr_milestones: tuple = _opt((35, 70, 95), "epochs at which the LR decays (Table 11)")
    lr_decay: float = _opt(0.1, "LR decay factor at each milestone (Table 11: 0.1)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(1e-4, "weight decay (Table 11: 1e-4)")
    eps_w: float = _opt(16 / PIXEL, "warmup radius, the PGD-AT radius (Table 11: 16)", "/255")
    gamma: float = _opt(4 / PIXEL, "discretisation gamma of Alg 2 (Table 11: 4)", "/255")
    beta: float = _opt(0.1, "averaging factor beta of Alg 2 (Table 11: 0.1)")
    warmup: int = _opt(30, "epochs at eps_w before Alg 2 (Table 11: 30)")
    eps_min: float = _opt(4 / PIXEL, "lower clip of the selected eps (App E.2: 4)", "/255")
    attack_steps: int = _opt(30, "PGD steps of the training attack (Table 11: 30)")
    step_size: float = _opt(1 / PIXEL, "step of the training attack (Table 11: 1)", "/255")
    select_steps: int = _opt(10, "PGD steps of Alg 2's selection attacks (App E.2: 10)")
    select_step_size: float = _opt(2 / PIXEL, "step of the selection attacks (paper silent; 2 "
                                              "lets 10 steps span the largest candidate, 20)", "/255")
    amp: str = _opt("fp16", "training precision: fp16 (App E.2, loss-scaled), bf16 or none")
    sync_bn: bool = _opt(False, "SyncBatchNorm across processes (batch statistics over the "
                                "global batch instead of each GPU's 32)")
    image_size: int = _opt(224, "training crop and validation centre crop")
    resize: int = _opt(256, "validation resize before the centre crop")
    workers: int = _opt(8, "data loader processes per training process")
    eval_eps: tuple = _opt(tuple(e / PIXEL for e in (4, 8, 12, 16)),
                           "radii of the random-targeted PGD evaluation (Table 4)", "/255")
    eval_steps: int = _opt(1000, "PGD steps of the evaluation (Table 4: 1000)")
    eval_step_size: float = _opt(1 / PIXEL, "step of the evaluation attack", "/255")
    eval_n: Optional[int] = _opt(None, "evaluate a seeded subset of N validation images")
    eval_batch: int = _opt(64, "evaluation images per process and batch")
    imagenet_c: Optional[str] = _opt(None, "ImageNet-C root (<corruption>/<1-5>/<class>/...) "
                                           "for the mCE column")
    evaluate_only: bool = _opt(False, "evaluate the run's checkpoint, do not train")
    seed: int = _opt(0, "random seed")
    out: Optional[str] = _opt(None, "run folder (default runs/imagenet-<arch>-<method>-seed<seed>)")
    device: str = _opt("auto", "auto, cpu or cuda")
    channels_last: str = _opt("auto", "NHWC layout: auto (CUDA with --amp), on or off")
    compile: bool = _opt(False, "torch.compile the model")
    save_every: int = _opt(500, "also checkpoint every N steps (0: at epoch ends only)")
    print_every: int = _opt(50, "log every N steps (rank 0)")


RUNTIME = {"data", "workers", "eval_n", "eval_batch", "eval_eps", "eval_steps", "eval_step_size",
           "imagenet_c", "evaluate_only", "out", "device", "channels_last", "compile",
           "save_every", "print_every", "epochs"}


def algorithm_config(c: ImageNetConfig, world: int) -> iaat.Config:
    """The iaat.Config that iaat.train_step reads: Alg 1 and 2 with Table 11's values."""
    cfg = iaat.Config(dataset="imagenet", model=c.arch, method=c.method, epochs=c.epochs,
                      batch_size=c.batch_size * world, lr=peak_lr(c, world),
                      momentum=c.momentum, weight_decay=c.weight_decay,
                      lr_milestones=c.lr_milestones, lr_decay=c.lr_decay, eps_w=c.eps_w,
                      gamma=c.gamma, beta=c.beta, warmup=c.warmup, eps_min=c.eps_min,
                      attack_steps=c.attack_steps, step_size=c.step_size,
                      select_steps=c.select_steps, select_step_size=c.select_step_size,
                      amp=c.amp, channels_last=c.channels_last, compile=c.compile, seed=c.seed)
    iaat.check_config(cfg)
    return cfg


def peak_lr(c: ImageNetConfig, world: int) -> float:
    """Table 11: 0.1 x (global batch / 256), unless --lr is given."""
    return c.lr if c.lr is not None else 0.1 * c.batch_size * world / 256


def lr_factor(c: ImageNetConfig, steps_per_epoch: int, world: int):
    """The LR multiplier at iteration `it`, for LambdaLR stepped once per iteration.

    Goyal et al.'s gradual warmup: from the LR of a batch of 256 (factor 256 / global batch)
    linearly up to the peak over lr_warmup epochs; no warmup when the global batch is <= 256.
    Then x lr_decay at each milestone epoch."""
    start = min(1.0, 256 / (c.batch_size * world))

    def factor(it: int) -> float:
        done = min(1.0, it / (c.lr_warmup * steps_per_epoch)) if c.lr_warmup else 1.0
        passed = sum(it >= m * steps_per_epoch for m in c.lr_milestones)
        return (start + (1 - start) * done) * c.lr_decay ** passed
    return factor


def check(c: ImageNetConfig) -> None:
    if c.arch not in ARCHS:
        raise IAATError(f"unknown --arch {c.arch!r}; choose from {', '.join(ARCHS)}")
    if not c.data:
        raise IAATError("--data is required: the ImageNet folder holding train/ and val/")
    for name in ("batch_size", "attack_steps", "select_steps", "eval_steps", "image_size",
                 "resize", "eval_batch", "print_every", "epochs", "eval_n"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise IAATError(f"--{name.replace('_', '-')} must be positive")
    if (c.lr is not None and not c.lr > 0) or not c.lr_decay > 0 or c.save_every < 0:
        raise IAATError("--lr and --lr-decay must be > 0 and --save-every >= 0")
    if any(not 0 <= e < 1 for e in c.eval_eps) or c.workers < 0 or c.lr_warmup < 0:
        raise IAATError("--eval-eps must lie in [0, 255), --workers and --lr-warmup >= 0")


# ============================================================================================
# Data and model
# ============================================================================================

class IndexedImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder that also returns each image's index: the key of its eps memory slot."""
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, y, i


def image_folder(root: Path, transform) -> IndexedImageFolder:
    if not root.is_dir():
        raise IAATError(f"{root} not found; --data must hold train/ and val/ class folders")
    try:
        return IndexedImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise IAATError(f"{root}: {str(err).splitlines()[0]}") from None


def train_set(c: ImageNetConfig) -> IndexedImageFolder:
    """RandomResizedCrop and flip; normalisation lives inside the model (pixels in [0,1])."""
    return image_folder(Path(c.data) / "train", T.Compose([
        T.RandomResizedCrop(c.image_size), T.RandomHorizontalFlip(), T.ToTensor()]))


def val_set(c: ImageNetConfig, root: Optional[Path] = None) -> IndexedImageFolder:
    """Resize 256, centre crop 224."""
    return image_folder(root or Path(c.data) / "val", T.Compose([
        T.Resize(c.resize), T.CenterCrop(c.image_size), T.ToTensor()]))


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (disjoint shards, the tail dropped so no image appears twice in an
    epoch: two processes must never update one eps slot at once) that can start an epoch at
    a given step, for a mid-epoch resume."""
    def __init__(self, dataset, d: iaat.Dist, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size, self.skip = batch_size, 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip * self.batch_size:])

    def __len__(self):
        return super().__len__() - self.skip * self.batch_size


def loader(dataset, sampler, c: ImageNetConfig, device, drop_last: bool):
    return torch.utils.data.DataLoader(
        dataset, batch_size=c.batch_size if drop_last else c.eval_batch, sampler=sampler,
        num_workers=c.workers, pin_memory=device.type == "cuda", drop_last=drop_last,
        persistent_workers=c.workers > 0)


def build_model(arch: str, num_classes: int, sync_bn: bool = False) -> nn.Module:
    """A torchvision ResNet behind iaat.Normalize, so the model takes images in [0,1];
    with `sync_bn`, its BatchNorms compute statistics over all processes' batches."""
    net = getattr(torchvision.models, arch)(num_classes=num_classes)
    model = nn.Sequential(iaat.Normalize(MEAN, STD), net)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


# ============================================================================================
# Training
# ============================================================================================

def run_folder(c: ImageNetConfig) -> Path:
    return Path(c.out or f"runs/imagenet-{c.arch}-{c.method}-seed{c.seed}")


def settings(c: ImageNetConfig) -> dict:
    return {k: v for k, v in iaat.config_dict(c).items() if k not in RUNTIME}


def train(c: ImageNetConfig, log=print) -> Path:
    """Train (or resume) into run_folder(c): checkpoint.pt, metrics.jsonl, eps_history.npy."""
    d = iaat.current_dist()
    log = log if d.main else (lambda msg: None)
    device = iaat.pick_device(c.device, d.local_rank)
    if c.sync_bn and d.world > 1 and device.type != "cuda":
        raise IAATError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU")
    out = run_folder(c)
    ckpt_path = out / "checkpoint.pt"
    ckpt = read(ckpt_path, c, d.world) if ckpt_path.exists() else iaat._check_fresh(out)
    data = train_set(c)
    iaat.same_everywhere(len(data), "the number of training images (is --data the same?)")
    n, steps_per_epoch = len(data), len(data) // d.world // c.batch_size
    if steps_per_epoch < 1:
        raise IAATError(f"{len(data)} training images do not fill one batch of {c.batch_size} "
                        f"on each of {d.world} processes")
    cfg = algorithm_config(c, d.world)
    torch.manual_seed(c.seed)
    model = build_model(c.arch, len(data.classes), c.sync_bn and d.world > 1).to(device)
    fast = iaat.fast_model(model, cfg, device)
    net = fast if d.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    net = torch.compile(net) if c.compile and d.world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=c.momentum,
                          weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(c, steps_per_epoch, d.world))
    scaler = torch.amp.GradScaler(device.type, enabled=c.amp == "fp16")
    mem = torch.full((n,), c.eps_w, device=device)
    visits = torch.zeros(n, dtype=torch.int32, device=device)
    epoch, step, totals = 0, 0, {}
    if ckpt is not None:
        # the sampler's order is fixed by (seed, epoch): no data generator state to restore
        epoch, step, totals = iaat.restore(ckpt, ckpt_path, model, opt, sched, mem, visits,
                                           scaler, data_state=False)
        log(f"resuming {out} at epoch {epoch} step {step}")
    # the epoch's running sums so far (global, so rank 0 alone carries them on) and its time
    spent = totals.get("time", 0.0)
    totals = {k: v for k, v in totals.items() if k not in ("processes", "time") and d.main}
    if d.rank > 0:
        torch.manual_seed(c.seed + 7919 * d.rank + 104729 * (epoch * 100_003 + step))
    iaat.same_everywhere((epoch, step), "the epoch and step to resume at")
    lock = problem = None  # rank 0 claims the folder; every process learns if it could not
    if d.main:
        try:
            lock = iaat.claim_run_dir(out)
        except IAATError as err:
            problem = err
    if iaat.any_process(problem is not None, device):
        raise problem or IAATError(f"rank 0 could not claim {out}")
    if d.main and ckpt is None:
        iaat.write_json(out / "config.json", iaat.config_dict(c))
    sampler = EpochSampler(data, d, c.seed, c.batch_size)
    batches = loader(data, sampler, c, device, drop_last=True)
    layout = torch.channels_last if iaat.channels_last(cfg, device) else torch.contiguous_format
    iaat._Stop.requested = False
    previous = signal.signal(signal.SIGTERM, iaat._on_sigterm)
    rows = iaat.read_metrics(out / "metrics.jsonl", epoch)
    history = read_eps_history(out / "eps_history.npy", epoch, n) if d.main else None
    log(f"{c.arch} {c.method}: {n} images, {len(data.classes)} classes, {d.world} processes x "
        f"{c.batch_size}, {steps_per_epoch} steps per epoch, peak LR {peak_lr(c, d.world):g}, "
        f"amp {c.amp}, {device}")

    def save(epoch, step, sums, seconds=0.0):
        """Every process calls this: the sums are all-reduced, checked, and rank 0 writes."""
        totals = dict(iaat.global_totals(sums), time=seconds) if sums else {}
        iaat._check_finite(totals.get("loss", 0.0), model, epoch, step, ckpt_path)
        if d.main:  # the world size is saved: the LR schedule and the shards depend on it
            iaat.save_checkpoint(ckpt_path, cfg=c, model=model, opt=opt, sched=sched, mem=mem,
                                 visits=visits, epoch=epoch, step=step, gen=None, scaler=scaler,
                                 totals={**totals, "processes": d.world})
        iaat.barrier()  # nobody exits before the checkpoint is on disk
    try:
        while epoch < c.epochs:
            sampler.set_epoch(epoch)
            sampler.skip = step
            sums = {k: torch.tensor(v, device=device) for k, v in totals.items()}
            totals, t0, t_log, n_log = {}, time.time() - spent, time.time(), 0
            spent = 0.0
            for step, (x, y, idx) in enumerate(batches, start=step):
                x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
                y, idx = y.to(device, non_blocking=True), idx.to(device, non_blocking=True)
                for k, v in iaat.train_step(fast, opt, x, y, idx, mem, epoch, cfg, net,
                                            scaler).items():
                    sums[k] = sums.get(k, 0) + v
                sched.step()
                if c.method == "iaat" and epoch >= c.warmup:
                    iaat.sync_memory(mem, visits, idx, c.batch_size, d)
                n_log += 1
                if (step + 1) % c.print_every == 0:
                    t = iaat.global_totals(sums)
                    rate = n_log * c.batch_size * d.world / (time.time() - t_log)
                    log(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} | loss "
                        f"{t['loss'] / t['n']:.3f} | acc {t['train_acc'] / t['n']:.3f} | eps "
                        f"{t['eps'] / t['n'] * PIXEL:.1f}/255 | {rate:.1f} img/s")
                    t_log, n_log = time.time(), 0
                stop = iaat.any_process(iaat._Stop.requested, device)
                if step + 1 < steps_per_epoch and (stop or (c.save_every and
                                                            (step + 1) % c.save_every == 0)):
                    save(epoch, step + 1, sums, time.time() - t0)
                    if stop:
                        log(f"SIGTERM: checkpoint saved at epoch {epoch} step {step + 1} in "
                            f"{out}; rerun the same command to resume")
                        raise SystemExit(143)
            t = iaat.global_totals(sums) if sums else {"n": 0}
            iaat._check_finite(t.get("loss", 0.0), model, epoch, steps_per_epoch, ckpt_path)
            epoch, step = epoch + 1, 0
            iaat.sync_buffers(model)
            seconds = time.time() - t0
            row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "seconds": round(seconds, 2)}
            if t["n"]:
                row.update(images=int(t["n"]), train_loss=t["loss"] / t["n"],
                           train_acc=t["train_acc"] / t["n"], eps_mean=t["eps"] / t["n"],
                           images_per_second=round(t["n"] / seconds, 2))
            rows.append(row)
            log(f"epoch {epoch}/{c.epochs} done | {json.dumps(row)}")
            if d.main:
                iaat.write_metrics(out / "metrics.jsonl", rows)
                history = np.concatenate([history, mem.cpu().numpy()[None].astype(np.float16)])
                iaat.write_eps_history(out / "eps_history.npy", history)
            save(epoch, 0, {})
            if iaat.any_process(iaat._Stop.requested, device):
                log(f"SIGTERM: checkpoint saved at epoch {epoch} in {out}; rerun to resume")
                raise SystemExit(143)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.close()
    digests = iaat.digests_everywhere([mem])
    if len(set(digests)) > 1:
        raise IAATError(f"the eps memories of the processes differ: {digests}")
    return out


def read(path: Path, c: ImageNetConfig, world: int) -> dict:
    """The run's checkpoint (weights_only, checked), if it was written with these settings
    and as many processes (the global batch sets the LR, its schedule and the shards)."""
    ckpt = iaat.read_checkpoint(path)
    saved = int(ckpt["totals"].get("processes", world))
    if saved != world:
        raise IAATError(f"checkpoint {path} was written by {saved} processes, this run has "
                        f"{world}; resume with {saved} (global batch {saved * c.batch_size})")
    mine, theirs = settings(c), {k: v for k, v in ckpt["config"].items() if k not in RUNTIME}
    if mine != theirs:
        k = next(k for k in mine if mine[k] != theirs.get(k))
        raise IAATError(f"checkpoint {path} was written with {k}={theirs.get(k)!r}, this run "
                        f"has {k}={mine[k]!r}; rerun with the same settings or another --out")
    return ckpt


def read_eps_history(path: Path, epoch: int, n: int) -> np.ndarray:
    """The eps history of the epochs done, read once at the start; rank 0 then appends a row
    per epoch in memory. float16 (1.28M images x 110 epochs is 280 MB)."""
    if epoch and path.exists():
        return np.load(path)[:epoch]
    return np.zeros((0, n), np.float16)


# ============================================================================================
# Evaluation: Table 4 (natural, random-targeted PGD in FP32, mCE)
# ============================================================================================

def evaluate(c: ImageNetConfig, model: nn.Module, device, log=print) -> dict:
    """Natural top-1 and random-targeted PGD accuracy at each eps, in FP32 and eval mode;
    each process takes a shard of the (seeded subset of) validation images."""
    d = iaat.current_dist()
    log = log if d.main else (lambda msg: None)
    val = val_set(c)
    chosen = iaat.eval_subset(len(val), c.eval_n, c.seed, "cpu")
    # one random target per validation image, fixed by the seed whatever the subset or shards
    targets = iaat.random_targets(torch.tensor(val.targets), len(val.classes),
                                  torch.Generator().manual_seed(c.seed))
    mine = torch.utils.data.Subset(val, chosen[d.rank::d.world].tolist())
    counts = torch.zeros(1 + len(c.eval_eps), device=device, dtype=torch.float64)
    with torch.autocast(device.type, enabled=False), iaat.model_mode(model, False):
        for x, y, idx in loader(mine, None, c, device, drop_last=False):
            x, y, t = x.to(device), y.to(device), targets[idx].to(device)
            with torch.no_grad():
                counts[0] += (model(x).argmax(1) == y).sum()
            for k, eps in enumerate(c.eval_eps):
                counts[1 + k] += iaat.attack_correct(
                    model, x, y, eps=eps, steps=c.eval_steps, step_size=c.eval_step_size,
                    target=t).sum()
    counts = iaat.all_sum(counts).tolist()
    result = {"images": len(chosen), "natural_top1": counts[0] / len(chosen),
              "targeted_pgd": {f"{eps * PIXEL:g}": v / len(chosen)
                               for eps, v in zip(c.eval_eps, counts[1:])},
              "pgd_steps": c.eval_steps, "pgd_step_255": c.eval_step_size * PIXEL}
    if c.imagenet_c:
        result["mce"], result["ce"] = corruption_errors(c, model, device)
    log(f"evaluation: {json.dumps(result)}")
    return result


def corruption_errors(c: ImageNetConfig, model: nn.Module, device) -> tuple:
    """ImageNet-C mCE, normalised by AlexNet (iaat.mean_corruption_error). ImageNet-C images
    are 224x224 already: centre crop only."""
    d, errors = iaat.current_dist(), {}
    tf = T.Compose([T.CenterCrop(c.image_size), T.ToTensor()])
    with torch.autocast(device.type, enabled=False), iaat.model_mode(model, False):
        for name in iaat.ALEXNET_ERR:
            errors[name] = [error_rate(c, model, device, Path(c.imagenet_c) / name / str(s), tf, d)
                            for s in range(1, 6)]
    return iaat.mean_corruption_error(errors)


def error_rate(c: ImageNetConfig, model, device, folder: Path, tf, d) -> float:
    """Top-1 error on one corruption and severity, sharded over the processes."""
    data = image_folder(folder, tf)
    mine = torch.utils.data.Subset(data, range(d.rank, len(data), d.world))
    wrong = torch.zeros(1, device=device, dtype=torch.float64)
    with torch.no_grad():
        for x, y, _ in loader(mine, None, c, device, drop_last=False):
            wrong += (model(x.to(device)).argmax(1) != y.to(device)).sum()
    return float(iaat.all_sum(wrong)) / len(data)


def evaluate_run(c: ImageNetConfig, log=print) -> dict:
    """Load the run's checkpoint into a fresh model and write eval.json beside it. The
    architecture comes from the checkpoint: --evaluate-only needs only --data and --out."""
    d = iaat.current_dist()
    out = run_folder(c)
    if not (out / "checkpoint.pt").is_file():
        raise IAATError(f"{out / 'checkpoint.pt'} not found; train first or give --out")
    ckpt = iaat.read_checkpoint(out / "checkpoint.pt")
    device = iaat.pick_device(c.device, d.local_rank)
    arch, state = ckpt["config"].get("arch"), ckpt["model"]
    if arch not in ARCHS or "1.fc.weight" not in state:
        raise IAATError(f"{out / 'checkpoint.pt'} is not an imagenet/train.py checkpoint")
    model = build_model(arch, state["1.fc.weight"].shape[0]).to(device).eval()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise IAATError(f"checkpoint does not fit {arch}: {str(err).splitlines()[0]}") from None
    result = evaluate(c, model, device, log) | {"epoch": ckpt["epoch"]}
    if d.main:
        iaat.write_json(out / "eval.json", result)
    return result


# ============================================================================================
# CLI
# ============================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = iaat._Parser(prog="imagenet/train.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(ImageNetConfig):
        flag, unit = "--" + f.name.replace("_", "-"), f.metadata["unit"]
        help = f.metadata["help"] + (" [x/255]" if unit else "")
        default = f.default
        if unit and default is not None:
            default = tuple(v * PIXEL for v in default) if isinstance(default, tuple) else \
                round(default * PIXEL, 6)
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=float if unit else int, nargs="+", default=default,
                           help=help)
        else:
            kind = int if "int" in f.type else float if "float" in f.type else str
            choices = {"arch": ARCHS, "method": iaat.METHODS, "amp": tuple(iaat.AMP),
                       "device": ("auto", "cpu", "cuda"),
                       "channels_last": ("auto", "on", "off")}.get(f.name)
            p.add_argument(flag, type=kind, default=default, choices=choices, help=help)
    return p


def config_from_args(argv) -> ImageNetConfig:
    args = vars(build_parser().parse_args(argv))
    for f in dataclasses.fields(ImageNetConfig):
        value = args[f.name]
        if f.metadata["unit"] and value is not None:
            value = tuple(v / PIXEL for v in value) if isinstance(value, (list, tuple)) else \
                value / PIXEL
        args[f.name] = tuple(value) if isinstance(value, list) else value
    c = ImageNetConfig(**args)
    check(c)
    return c


def main(argv=None) -> int:
    joined = False
    try:
        c = config_from_args(sys.argv[1:] if argv is None else argv)
        joined = iaat.init_distributed(c.device)
        if not c.evaluate_only:
            train(c)
        evaluate_run(c)
    except (IAATError, OSError) as err:
        print(f"imagenet/train.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
