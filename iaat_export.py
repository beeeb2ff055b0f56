"""Share a trained run the way the field does: a checkpoint RobustBench loads, and the run's
result in RobustBench's model_info format (docs/robustbench.md).

    iaat export runs/cifar10-resnet18-iaat-seed0 exports/iaat-resnet18   # or: python iaat.py export
    iaat export RUN OUT --checkpoint best      # a --val-size run's best epoch
    iaat export RUN OUT --weights ema          # the weight average of a run trained with --ema

OUT receives, all or nothing:
- model.pt: {"state_dict": ..., "iaat": the record below}. The keys are those of RobustBench's
  own architecture class where one matches the network (PreAct ResNet-18 and WideResNet-34-10
  on CIFAR's 3x32x32 images), else those of the one-file definition model.py; the input
  normalisation travels as the buffers mu and sigma, as in RobustBench's model zoo, so the
  model takes images in [0,1] like every RobustBench model.
- model.py: `build()` returns that network in eval mode, normalisation inside.
- export.json: the record (run, settings, which epoch and how it was chosen, the evaluation
  `iaat eval` made of this checkpoint) and model.pt's SHA-256.
- model_info.json, where the evaluation ran AutoAttack: RobustBench's model_info.

This module imports iaat, iaat_run, iaat_report and iaat_eval; iaat.py imports it only inside
main, for `iaat export`.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from iaat import PIXEL, PreActBlock, PreActNet, PreActResNet18, SmallCNN, WideResNet
from iaat_eval import CHECKPOINTS, DATASET_SHAPES, WEIGHTS, load_model, run_config
from iaat_report import ARCHITECTURE_NAMES, model_info
from iaat_run import CLIParser, IAATError, atomic_write, best_row, config_dict, read_metrics

# iaat's networks that a RobustBench architecture class fits, on CIFAR's 3x32x32 images: the
# class and its arguments, and where iaat's keys go. Block i of iaat's PreActNet.layers is
# block i % per_stage of stage i // per_stage (`stage` names it), its 1x1 projection
# `shortcut`; `head` renames the stem convolution, the last BatchNorm and the classifier.
ROBUSTBENCH_CLASSES = {
    "resnet18": dict(module="robustbench.model_zoo.architectures.resnet", cls="PreActResNet",
                     imports="PreActBlock, PreActResNet",
                     args="PreActBlock, [2, 2, 2, 2], num_classes=NUM_CLASSES, "
                          "bn_before_fc=True, out_shortcut=True",
                     per_stage=2, stage="layer{}.{}.", shortcut="shortcut.0.",
                     head={"conv1.": "conv1.", "bn.": "bn.", "fc.": "linear."}),
    "wrn32-10": dict(module="robustbench.model_zoo.architectures.wide_resnet", cls="WideResNet",
                     imports="WideResNet", args="depth=34, num_classes=NUM_CLASSES, widen_factor=10",
                     per_stage=5, stage="block{}.layer.{}.", shortcut="convShortcut.",
                     head={"conv1.": "conv1.", "bn.": "bn1.", "fc.": "fc."}),
}
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100")  # 3x32x32: what RobustBench's classes take
# the one-file definition: iaat's own classes of each network, copied, and its constructor
ONE_FILE = {"smallcnn": ((SmallCNN,), "SmallCNN(IN_CHANNELS, NUM_CLASSES)"),
            "resnet18": ((PreActBlock, PreActNet, PreActResNet18),
                         "PreActResNet18(NUM_CLASSES, IN_CHANNELS)"),
            "wrn32-10": ((PreActBlock, PreActNet, WideResNet),
                         "WideResNet(34, 10, NUM_CLASSES, IN_CHANNELS)")}
NORMALIZE = {"0.mean": "mu", "0.std": "sigma"}  # iaat.Normalize -> the model zoo's buffers
IMAGE_SIZES = {"digits": 8, "cifar10": 32, "cifar100": 32}


def robustbench_class(dataset: str, model: str) -> Optional[dict]:
    """The RobustBench class the network fits on this dataset's images, or None (model.py's)."""
    return ROBUSTBENCH_CLASSES.get(model) if dataset in ROBUSTBENCH_DATASETS else None


def exported_key(key: str, spec: Optional[dict]) -> str:
    """One key of iaat's Normalize + network (nn.Sequential: "0.", "1.") under the names of
    the RobustBench class `spec`, or of model.py's IAATNet (the network as `net`) for None."""
    if key in NORMALIZE:
        return NORMALIZE[key]
    key = key.removeprefix("1.")
    if spec is None:
        return "net." + key
    block = re.fullmatch(r"layers\.(\d+)\.(shortcut\.)?(.+)", key)
    if block:
        i, shortcut, rest = int(block[1]), block[2], block[3]
        return (spec["stage"].format(i // spec["per_stage"] + 1, i % spec["per_stage"])
                + (spec["shortcut"] if shortcut else "") + rest)
    head = [h for h in spec["head"] if key.startswith(h)]
    if not head:
        raise IAATError(f"no RobustBench name for the weight {key!r} of {spec['cls']}")
    return spec["head"][head[0]] + key[len(head[0]):]


def model_source(dataset: str, model: str, mean: list, std: list, what: str) -> str:
    """model.py: the exported network with its normalisation, `build()` in eval mode; RobustBench's
    class with mu and sigma in front (as its model zoo's entries), else iaat's own classes."""
    (channels, classes), size = DATASET_SHAPES[dataset], IMAGE_SIZES[dataset]
    spec = robustbench_class(dataset, model)
    text = f'''"""The network of an iaat export ({what}), written by `iaat export`.

It takes ({channels}, {size}, {size}) images in [0,1]: the input normalisation is inside forward,
as the buffers mu and sigma (as in RobustBench's model zoo).

    import torch
    from model import build
    model = build()
    model.load_state_dict(torch.load("model.pt", weights_only=True)["state_dict"])
"""
import torch
import torch.nn as nn
'''
    if spec:
        text += f"from {spec['module']} import {spec['imports']}\n"
        base, make, call = spec["cls"], f"super().__init__({spec['args']})", "super().forward"
    else:
        text += "import torch.nn.functional as F\n" + "".join(
            "\n\n" + inspect.getsource(c) for c in ONE_FILE[model][0])
        base, make, call = "nn.Module", f"super().__init__()\n        self.net = " \
            f"{ONE_FILE[model][1]}", "self.net"
    return text + f'''

NUM_CLASSES, IN_CHANNELS = {classes}, {channels}
MEAN, STD = {tuple(mean)}, {tuple(std)}  # per channel, in [0,1]: the images trained on


class IAATNet({base}):
    """{ARCHITECTURE_NAMES[model]} with the input normalisation in front."""

    def __init__(self):
        {make}
        self.register_buffer("mu", torch.tensor(MEAN).view(1, -1, 1, 1))
        self.register_buffer("sigma", torch.tensor(STD).view(1, -1, 1, 1))

    def forward(self, x):
        return {call}((x - self.mu) / self.sigma)


def build() -> nn.Module:
    """The network in eval mode; load model.pt's state_dict into it."""
    return IAATNet().eval()
'''


def recorded_evaluation(run: Path, checkpoint: str, epoch: int, name: Optional[str],
                        weights: str = "raw") -> tuple:
    """(file name, results) of `iaat eval`'s evaluation of these weights of this checkpoint,
    <run>/<name>.json (default eval or eval_best, then _ema for the weight average);
    IAATError if it is missing, unfinished, of another epoch or of the other weights."""
    default = ("eval" if checkpoint == "last" else "eval_best") + \
        ("_ema" if weights == "ema" else "")
    name = name or default
    path = run / f"{name}.json"
    redo = f"iaat eval {run}" + (" --checkpoint best" if checkpoint == "best" else "") + \
        f" --weights {weights}" + ("" if name == default else f" --name {name}")
    if not path.is_file():
        raise IAATError(f"{path} not found: evaluate the checkpoint first ({redo}, with "
                        "--parts autoattack for RobustBench); the export records its evaluation")
    try:
        res = json.loads(path.read_text())
    except ValueError as err:
        raise IAATError(f"{path} is not JSON ({err}); rerun {redo}") from None
    if not isinstance(res, dict) or not res.get("complete"):
        raise IAATError(f"{path} is an unfinished evaluation; rerun {redo}")
    if (res.get("checkpoint"), res.get("checkpoint_epoch")) != (checkpoint, epoch):
        raise IAATError(f"{path} evaluated the {res.get('checkpoint')} checkpoint at epoch "
                        f"{res.get('checkpoint_epoch')}, the {checkpoint} one holds epoch {epoch};"
                        f" rerun {redo}")
    if res.get("weights", "raw") != weights:
        raise IAATError(f"{path} evaluated the {res.get('weights')} weights, the export takes "
                        f"the {weights} ones; rerun {redo}")
    return path.name, res


def how_chosen(run: Path, cfg, checkpoint: str, epoch: int) -> str:
    """Which epoch the checkpoint holds and why, in words."""
    if checkpoint == "last":
        return (f"the last checkpoint: epoch {epoch} of {cfg.epochs}, the paper's protocol"
                + ("" if epoch == cfg.epochs else " (training had not finished)"))
    best = best_row(read_metrics(run / "metrics.jsonl", epoch))
    return (f"the best checkpoint: epoch {epoch} of {cfg.epochs}, the first with the highest "
            f"PGD-{cfg.attack_steps} accuracy at {cfg.eps_test * PIXEL:g}/255 (step "
            f"{cfg.eval_step_size * PIXEL:g}/255) on the {cfg.val_size} training images held out "
            f"by --val-size (split seed {cfg.split_seed}, never trained on): val_pgd "
            f"{best.get('val_pgd', float('nan')):.4f}; never chosen on the test set")


def write_folder(out: Path, files: dict) -> None:
    """Write `files` (name -> bytes) as the folder `out`, all or nothing: into a temporary
    folder beside it, renamed into place. An earlier export (or an empty folder) at `out` is
    replaced; anything else there is refused, untouched."""
    if out.exists() and not (out.is_dir() and ((out / "export.json").is_file()
                                               or not any(out.iterdir()))):
        raise IAATError(f"{out} exists and is not an iaat export; choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    try:
        tmp.mkdir()
        for name, blob in files.items():
            atomic_write(tmp / name, lambda p, blob=blob: p.write_bytes(blob))
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def export_run(run, out, checkpoint: str = "last", eval_name: Optional[str] = None,
               weights: Optional[str] = None) -> dict:
    """`iaat export RUN OUT`: the run's last (or best) checkpoint in RobustBench's formats, its
    trained weights or (`weights` "ema") their average (default, as `iaat eval`'s: the average
    where the run kept one), with the record of where it came from (module docstring);
    returns the record."""
    run, out = Path(run), Path(out)
    cfg, ckpt = run_config(run, checkpoint)
    weights = weights or ("ema" if "ema" in ckpt else "raw")
    net = load_model(run, "cpu", cfg, ckpt, weights)  # checks that the weights fit the network
    eval_file, res = recorded_evaluation(run, checkpoint, ckpt["epoch"], eval_name, weights)
    spec = robustbench_class(cfg.dataset, cfg.model)
    state = {exported_key(k, spec): v for k, v in net.state_dict().items()}
    mean, std = (net.state_dict()[k].flatten().tolist() for k in NORMALIZE)
    what = f"{cfg.dataset} {cfg.model} {cfg.method} seed {cfg.seed}, {checkpoint} checkpoint, " \
           f"epoch {ckpt['epoch']}" + (", weight average" if weights == "ema" else "")
    shape = (DATASET_SHAPES[cfg.dataset][0],) + (IMAGE_SIZES[cfg.dataset],) * 2
    record = {"run": str(run), "checkpoint": checkpoint, "weights": weights, "epoch": ckpt["epoch"],
              "epochs": cfg.epochs, "chosen": how_chosen(run, cfg, checkpoint, ckpt["epoch"]),
              "architecture": ARCHITECTURE_NAMES[cfg.model], "definition": "model.py",
              "robustbench_class": f"{spec['module']}.{spec['cls']}" if spec else None,
              "input": f"{shape} images in [0,1]; normalisation inside (mu, sigma)",
              "mean": mean, "std": std, "config": config_dict(cfg),
              "evaluation_file": eval_file, "evaluation": res}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "iaat": record}, buffer)
    files = {"model.pt": buffer.getvalue(),
             "model.py": model_source(cfg.dataset, cfg.model, mean, std, what).encode()}
    record["sha256"] = {"model.pt": hashlib.sha256(files["model.pt"]).hexdigest()}
    files["export.json"] = (json.dumps(record, indent=1) + "\n").encode()
    standard = "autoattack_details" in res  # standard AutoAttack ran (iaat_report.model_info)
    if standard:
        files["model_info.json"] = (json.dumps(model_info(res), indent=2) + "\n").encode()
    write_folder(out, files)
    print(f"exported {what} to {out}: {', '.join(files)}" + ("" if standard else
          f" (no model_info.json: {eval_file} has no AutoAttack; iaat eval --parts autoattack)"))
    return record


def build_export_parser() -> CLIParser:
    p = CLIParser(prog="iaat export", description="A run's checkpoint as RobustBench loads it "
                  "(model.pt, model.py), what it is (export.json) and, where its evaluation ran "
                  "AutoAttack, RobustBench's model_info.json; see docs/robustbench.md.")
    p.add_argument("run", type=Path, help="run folder written by iaat.py, evaluated by iaat eval")
    p.add_argument("out", type=Path, help="folder to write (an earlier export there is replaced)")
    p.add_argument("--checkpoint", choices=tuple(CHECKPOINTS), default="last",
                   help="last (the paper's protocol) or best: the best epoch on the held-out "
                        "images of a run trained with --val-size")
    p.add_argument("--weights", choices=WEIGHTS, help="raw: the trained weights; ema: the "
                   "weight average of a run trained with --ema (default, as iaat eval's: ema "
                   "where the run kept one, else raw)")
    p.add_argument("--eval-name", help="stem of the evaluation to record (default: eval, "
                   "eval_best for --checkpoint best, then _ema for --weights ema: iaat eval's "
                   "--name)")
    return p


def main(argv=None) -> int:
    """`iaat export RUN OUT [--checkpoint best] [--eval-name NAME]`."""
    args = build_export_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export_run(args.run, args.out, args.checkpoint, args.eval_name, args.weights)
    except (IAATError, OSError) as err:
        print(f"iaat: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
