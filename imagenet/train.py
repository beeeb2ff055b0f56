"""IAAT on ImageNet with torchrun: the paper's Table 11 recipe (Sec 4.2, App E.2).

One process per GPU; every setting is a flag (python imagenet/train.py --help):

    torchrun --standalone --nproc_per_node=8 imagenet/train.py --data /path/to/imagenet \\
        --arch resnet50                              # IAAT, Table 11 (32 images per GPU)
    torchrun ... imagenet/train.py --data ... --method at      # PGD-AT at 16/255 (Xie et al.)
    torchrun ... imagenet/train.py --data ... --method clean
    torchrun --nnodes=8 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=iaat50 imagenet/train.py --data ... --arch resnet50      # 64 GPUs

A thin launcher over iaat.py: its settings are iaat.Config's plus ImageNet's own, and it runs
iaat's training loop (`iaat.train_loop`: Alg 1 with Alg 2's radius selection, checkpoints,
resume, SIGTERM) with what ImageNet needs around it: ImageFolder loaders with a
DistributedSampler, torchvision ResNets, the Goyal et al. LR schedule stepped per iteration,
SyncBatchNorm, fp16 attacks with a loss scaled before each input gradient
(`iaat_fp16.fp16_input_grad`), and the Sec 4.2 evaluation (natural top-1, random-targeted PGD at
eps 4/8/12/16 in FP32, ImageNet-C mCE). Rerunning a command resumes its run folder.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iaat  # noqa: E402  (the repository's iaat.py, also when run as a script)
import iaat_eval  # noqa: E402
import iaat_run  # noqa: E402
from iaat import PIXEL, option  # noqa: E402
from iaat_run import IAATError  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet statistics
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# ============================================================================================
# Settings: iaat.Config with paper Table 11 and App E.2 as the defaults, plus ImageNet's own
# ============================================================================================

TABLE_11 = dict(dataset="imagenet", model="resnet50", epochs=110, batch_size=32,
                lr_milestones=(35, 70, 95), lr_decay=0.1, weight_decay=1e-4, eps_w=16 / PIXEL,
                gamma=4 / PIXEL, beta=0.1, warmup=30, eps_min=4 / PIXEL, attack_steps=30,
                step_size=1 / PIXEL, select_steps=10, select_step_size=2 / PIXEL, amp="fp16",
                eval_steps=1000, eval_step_size=1 / PIXEL, eval_batch=64, save_every=500)
# the select step is the paper's silence: 2/255 lets 10 steps span the largest candidate, 20


@dataclass
class ImageNetConfig(iaat.Config):
    """iaat.Config, whose fields keep their meaning except these three, plus ImageNet's own
    settings; `imagenet_config` fills in TABLE_11. /255 fields are entered in 0-255 units."""
    model: Optional[str] = option("resnet50", "torchvision ResNet: " + ", ".join(ARCHS))
    batch_size: int = option(32, "images per process (Table 11: 32 per GPU)")
    lr: Optional[float] = option(None, "peak LR (Table 11: 0.1 x global batch / 256)")
    data: str = option("", "ImageNet root holding train/ and val/ class folders (ImageFolder)")
    lr_warmup: int = option(5, "epochs of linear LR warmup (Goyal et al.)")
    sync_bn: bool = option(False, "SyncBatchNorm across processes (batch statistics over the "
                                  "global batch instead of each GPU's 32)")
    image_size: int = option(224, "training crop and validation centre crop")
    resize: int = option(256, "validation resize before the centre crop")
    workers: int = option(8, "data loader processes per training process")
    eval_eps: tuple = option(tuple(e / PIXEL for e in (4, 8, 12, 16)),
                             "radii of the random-targeted PGD evaluation (Table 4)", "/255")
    eval_n: Optional[int] = option(None, "evaluate a seeded subset of N validation images")
    imagenet_c: Optional[str] = option(None, "ImageNet-C root (<corruption>/<1-5>/<class>/...) "
                                             "for the mCE column")
    evaluate_only: bool = option(False, "evaluate the run's checkpoint, do not train")
    print_every: int = option(50, "log the running loss, accuracy, eps and images/s every N steps")

    RUNTIME: ClassVar[frozenset] = iaat.Config.RUNTIME | {
        "data", "workers", "eval_n", "eval_eps", "eval_steps", "eval_step_size", "imagenet_c",
        "evaluate_only", "print_every"}


# iaat.Config fields that ImageNet does not use: no flag for them
UNUSED = ("dataset", "split_seed", "n_train", "label_noise", "val_size", "data_root", "download",
          "eps_test", "eval_subset", "threads")


def imagenet_config(**settings) -> ImageNetConfig:
    """Table 11's recipe with these settings; IAATError on a bad one."""
    c = ImageNetConfig(**{**TABLE_11, **settings})
    check(c)
    return c


def algorithm_config(c: ImageNetConfig, world: int) -> ImageNetConfig:
    """The settings with the peak LR of `world` processes filled in."""
    return dataclasses.replace(c, lr=peak_lr(c, world))


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
    if c.model not in ARCHS:
        raise IAATError(f"unknown --arch {c.model!r}; choose from {', '.join(ARCHS)}")
    if not c.data:
        raise IAATError("--data is required: the ImageNet folder holding train/ and val/")
    for name in ("image_size", "resize", "eval_n", "print_every"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise IAATError(f"--{name.replace('_', '-')} must be positive")
    if c.lr is not None and not c.lr > 0:
        raise IAATError("--lr must be > 0")
    if any(not 0 <= e < 1 for e in c.eval_eps) or c.workers < 0 or c.lr_warmup < 0:
        raise IAATError("--eval-eps must lie in [0, 255), --workers and --lr-warmup >= 0")
    iaat.check_config(algorithm_config(c, 1))  # the algorithm's and the run's settings


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
    def __init__(self, dataset, d: iaat_run.Dist, seed: int, batch_size: int):
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
# Training: iaat's loop over ImageFolder batches, the LR stepped per iteration
# ============================================================================================

def run_folder(c: ImageNetConfig) -> Path:
    return Path(c.out or f"runs/imagenet-{c.model}-{c.method}-seed{c.seed}")


def train(c: ImageNetConfig, log=print) -> Path:
    """Train (or resume) into run_folder(c): checkpoint.pt, metrics.jsonl, eps_history.npy
    (float16: 1.28M images x 110 epochs is 280 MB) and the plots, by iaat.train_loop."""
    d = iaat_run.current_dist()
    log = log if d.main else (lambda msg: None)
    device = iaat_run.pick_device(c.device, d.local_rank)
    if c.sync_bn and d.world > 1 and device.type != "cuda":
        raise IAATError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU")
    out = run_folder(c)
    ckpt = iaat_run.open_run(out, c)
    saved = ckpt and ckpt.get("processes", ckpt["totals"].get("processes"))  # or kept in totals
    if ckpt is not None and saved != d.world:  # the global batch sets the LR and the shards
        raise IAATError(f"checkpoint {out / 'checkpoint.pt'} was written by {saved} processes, "
                        f"this run has {d.world}; resume with {saved} (global batch "
                        f"{saved * c.batch_size})")
    data = train_set(c)
    iaat_run.same_everywhere(len(data), "the number of training images (is --data the same?)")
    n, steps_per_epoch = len(data), len(data) // d.world // c.batch_size
    if steps_per_epoch < 1:
        raise IAATError(f"{len(data)} training images do not fill one batch of {c.batch_size} "
                        f"on each of {d.world} processes")
    torch.manual_seed(c.seed)
    model = build_model(c.model, len(data.classes), c.sync_bn and d.world > 1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr(c, d.world), momentum=c.momentum,
                          weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(c, steps_per_epoch, d.world))
    s = iaat.make_state(model, c, n, opt, sched)
    # the sampler's order is fixed by (seed, epoch): no data generator state to restore
    totals = iaat_run.restore(ckpt, out / "checkpoint.pt", s, data_state=False) if ckpt else {}
    sampler = EpochSampler(data, d, c.seed, c.batch_size)
    images = loader(data, sampler, c, device, drop_last=True)
    layout = torch.channels_last if iaat.uses_channels_last(c, device) else torch.contiguous_format
    log(f"{c.model} {c.method}: {n} images, {len(data.classes)} classes, {d.world} processes x "
        f"{c.batch_size}, {steps_per_epoch} steps per epoch, peak LR {peak_lr(c, d.world):g}, "
        f"amp {c.amp}, {device}")

    def batches(epoch: int, start: int):
        sampler.set_epoch(epoch)
        sampler.skip = start

        def stream():
            for x, y, idx in images:
                yield (x.to(device, non_blocking=True).contiguous(memory_format=layout),
                       y.to(device, non_blocking=True), idx.to(device, non_blocking=True))
        return stream(), None
    clock = {"time": time.time(), "step": 0}

    def progress(s: iaat.TrainState, sums: dict) -> None:
        """Every --print-every steps: the epoch's running means and the images per second
        over all processes since the last line (every process takes part: a collective)."""
        if s.step % c.print_every:
            return
        t, now, since = iaat_run.global_totals(sums), time.time(), s.step - clock["step"]
        rate = (since if since > 0 else s.step) * c.batch_size * d.world / (now - clock["time"])
        log(f"epoch {s.epoch + 1} step {s.step}/{steps_per_epoch} | loss {t['loss'] / t['n']:.3f}"
            f" | acc {t['train_acc'] / t['n']:.3f} | eps {t['eps'] / t['n'] * PIXEL:.1f}/255 | "
            f"{rate:.1f} img/s")
        clock.update(time=now, step=s.step)
    iaat.train_loop(c, s, out, totals, batches, steps_per_epoch, c.batch_size, log,
                    on_step=progress, lr_per_step=True, history_dtype=np.float16)
    iaat.state_hashes(s)
    return out


# ============================================================================================
# Evaluation: Table 4 (natural, random-targeted PGD in FP32, mCE)
# ============================================================================================

def evaluate(c: ImageNetConfig, model: nn.Module, device, log=print) -> dict:
    """Natural top-1 and random-targeted PGD accuracy at each eps, in FP32 and eval mode;
    each process takes a shard of the (seeded subset of) validation images."""
    d = iaat_run.current_dist()
    log = log if d.main else (lambda msg: None)
    val = val_set(c)
    chosen = iaat_eval.test_subset(len(val), c.eval_n, c.seed, "cpu")
    # one random target per validation image, fixed by the seed whatever the subset or shards
    targets = iaat_eval.random_targets(torch.tensor(val.targets), len(val.classes),
                                       torch.Generator().manual_seed(c.seed))
    mine = torch.utils.data.Subset(val, chosen[d.rank::d.world].tolist())
    counts = torch.zeros(1 + len(c.eval_eps), device=device, dtype=torch.float64)
    with torch.autocast(device.type, enabled=False), iaat.model_mode(model, False):
        for x, y, idx in loader(mine, None, c, device, drop_last=False):
            x, y, t = x.to(device), y.to(device), targets[idx].to(device)
            with torch.no_grad():
                counts[0] += (model(x).argmax(1) == y).sum()
            for k, eps in enumerate(c.eval_eps):
                counts[1 + k] += iaat_eval.attack_correct(
                    model, x, y, eps=eps, steps=c.eval_steps, step_size=c.eval_step_size,
                    target=t).sum()
    counts = iaat_run.all_sum(counts).tolist()
    result = {"images": len(chosen), "natural_top1": counts[0] / len(chosen),
              "targeted_pgd": {f"{eps * PIXEL:g}": v / len(chosen)
                               for eps, v in zip(c.eval_eps, counts[1:])},
              "pgd_steps": c.eval_steps, "pgd_step_255": c.eval_step_size * PIXEL}
    if c.imagenet_c:
        result["mce"], result["ce"] = corruption_errors(c, model, device)
    log(f"evaluation: {json.dumps(result)}")
    return result


def corruption_errors(c: ImageNetConfig, model: nn.Module, device) -> tuple:
    """ImageNet-C mCE, normalised by AlexNet (iaat_eval.mean_corruption_error). ImageNet-C
    images are 224x224 already: centre crop only."""
    d, errors = iaat_run.current_dist(), {}
    tf = T.Compose([T.CenterCrop(c.image_size), T.ToTensor()])
    with torch.autocast(device.type, enabled=False), iaat.model_mode(model, False):
        for name in iaat_eval.ALEXNET_ERR:
            errors[name] = [error_rate(c, model, device, Path(c.imagenet_c) / name / str(s), tf, d)
                            for s in range(1, 6)]
    return iaat_eval.mean_corruption_error(errors)


def error_rate(c: ImageNetConfig, model, device, folder: Path, tf, d) -> float:
    """Top-1 error on one corruption and severity, sharded over the processes."""
    data = image_folder(folder, tf)
    mine = torch.utils.data.Subset(data, range(d.rank, len(data), d.world))
    wrong = torch.zeros(1, device=device, dtype=torch.float64)
    with torch.no_grad():
        for x, y, _ in loader(mine, None, c, device, drop_last=False):
            wrong += (model(x.to(device)).argmax(1) != y.to(device)).sum()
    return float(iaat_run.all_sum(wrong)) / len(data)


def evaluate_run(c: ImageNetConfig, log=print) -> dict:
    """Load the run's checkpoint into a fresh model and write eval.json beside it; for a run
    trained with --ema, evaluate its weight average too, into eval_ema.json. The architecture
    comes from the checkpoint: --evaluate-only needs only --data and --out. Returns the
    trained weights' result."""
    d = iaat_run.current_dist()
    out = run_folder(c)
    if not (out / "checkpoint.pt").is_file():
        raise IAATError(f"{out / 'checkpoint.pt'} not found; train first or give --out")
    ckpt = iaat_run.read_checkpoint(out / "checkpoint.pt")
    device = iaat_run.pick_device(c.device, d.local_rank)
    arch, state = ckpt["config"].get("model", ckpt["config"].get("arch")), ckpt["model"]
    if arch not in ARCHS or "1.fc.weight" not in state:
        raise IAATError(f"{out / 'checkpoint.pt'} is not an imagenet/train.py checkpoint")
    model = build_model(arch, state["1.fc.weight"].shape[0]).to(device).eval()
    results = {}
    for weights, key, name in (("raw", "model", "eval.json"), ("ema", "ema", "eval_ema.json")):
        if key not in ckpt:
            continue
        try:
            model.load_state_dict(ckpt[key])
        except RuntimeError as err:
            raise IAATError(f"checkpoint does not fit {arch}: {str(err).splitlines()[0]}") from None
        if weights == "ema" and d.main:
            log("evaluating the weight average (--ema)")
        results[weights] = evaluate(c, model, device, log) | {"epoch": ckpt["epoch"],
                                                              "weights": weights}
        if d.main:
            iaat_run.write_json(out / name, results[weights])
    return results["raw"]


# ============================================================================================
# CLI
# ============================================================================================

def build_parser():
    p = iaat_run.CLIParser(prog="imagenet/train.py", description=__doc__.split("\n\n")[0])
    iaat.add_config_flags(p, ImageNetConfig, {"imagenet": TABLE_11}, skip=UNUSED,
                          choices={"model": ARCHS},
                          aliases={"model": ["--arch"]})
    return p


def config_from_args(argv) -> ImageNetConfig:
    values = iaat_run.dataclass_values(build_parser().parse_args(argv), ImageNetConfig, PIXEL)
    return imagenet_config(**{k: v for k, v in values.items() if v is not None})


def main(argv=None) -> int:
    try:
        c = config_from_args(sys.argv[1:] if argv is None else argv)
        with iaat_run.process_group(iaat_run.pick_device(c.device)):
            if not c.evaluate_only:
                train(c)
            evaluate_run(c)
    except (IAATError, OSError) as err:
        print(f"imagenet/train.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    iaat_run.exit_process(main())
