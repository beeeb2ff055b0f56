"""The paper's Table 1 (CIFAR-10) or Table 2 (CIFAR-100) with one command, on one GPU.

    bash scripts/reproduce_table1.sh cifar10 resnet18            # Table 1, ResNet-18 rows
    bash scripts/reproduce_table1.sh cifar10 wrn32-10 --corruptions data/CIFAR-10-C
    bash scripts/reproduce_table1.sh cifar100 resnet18 --estimate   # the expected time only

1. Train clean, PGD-AT, TRADES, IAAT and IAAT with the TRADES loss with the paper's settings
   (the iaat.py presets, Table 10; TRADES with trades.py's beta 6, radius 0.031 and step
   0.007), seeds 0 and 1. Seed 1 is the independently trained copy whose attacks transfer to
   seed 0. With --ema DECAY every run also
   keeps a weight average (into folders ending in -ema<DECAY>).
2. Evaluate each seed-0 run on the whole test set: natural, PGD-10x5, PGD-100x5, PGD-1000x2,
   the transfer PGD-1000x2 from seed 1, standard AutoAttack, and with --corruptions the
   CIFAR-10-C accuracy (`iaat.py eval`, the paper preset); with --ema, the weight average too.
3. Print the table beside the paper's numbers and write it to OUT/table-DATASET-MODEL.md.
4. Export the adversarially trained runs (seed 0) in RobustBench's formats, with their evaluation
   and its model_info: OUT/export-<run>/ (`iaat.py export`, docs/robustbench.md).

Rerunning the command skips what is done: a finished run (its summary.json with these
settings), a complete evaluation (eval.json) of that run's final checkpoint by the same
command, an export of that evaluation; a run cut short resumes, an evaluation cut short
restarts. Everything runs in this
one process, one stage after another; each stage prints the `python iaat.py ...` command it
stands for.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import iaat  # noqa: E402
import iaat_notebook  # noqa: E402
import iaat_run  # noqa: E402

METHODS = ("clean", "at", "trades", "iaat", "iaat-trades")
# TRADES runs at trades.py's CIFAR radius and step (0.031, 0.007); the other rows at the paper's
FLAGS = {"clean": ["--method", "clean"], "at": ["--method", "at"],
         "trades": ["--method", "trades", "--eps-w", "7.905", "--step-size", "1.785"],
         "iaat": ["--method", "iaat"], "iaat-trades": ["--method", "iaat", "--loss", "trades"]}
SEEDS = (0, 1)  # seed 1: the transfer attack's source
PAPER_COLUMNS = ("natural", "PGD-10x5", "PGD-100x5", "PGD-1000x2", "transfer", "corruptions")
# Tables 1 and 2 of the paper (accuracy, %) in PAPER_COLUMNS: the transfer attack is PGD-1000x2,
# the corruptions are CIFAR-10-C (Table 1 only); the paper has no AutoAttack column
PAPER = {
    ("cifar10", "resnet18"): {"clean": (94.21, 0.02, 0.00, 0.00, 3.03, 72.71),
                              "at": (83.20, 43.79, 42.30, 42.36, 59.80, 73.73),
                              "iaat": (87.26, 43.08, 41.16, 41.16, 59.87, 78.82)},
    ("cifar10", "wrn32-10"): {"clean": (95.50, 0.05, 0.00, 0.00, 5.02, 78.35),
                              "at": (86.85, 46.86, 44.82, 44.84, 62.77, 77.99),
                              "iaat": (91.34, 48.53, 46.50, 46.54, 58.20, 83.13)},
    ("cifar100", "resnet18"): {"clean": (74.88, 0.02, 0.00, 0.01, 1.81, None),
                               "at": (55.11, 20.69, 19.68, 19.91, 35.57, None),
                               "iaat": (63.90, 18.50, 17.10, 17.11, 35.74, None)},
    ("cifar100", "wrn32-10"): {"clean": (79.91, 0.01, 0.00, 0.00, 1.20, None),
                               "at": (59.58, 26.24, 25.47, 25.49, 38.10, None),
                               "iaat": (68.80, 26.17, 24.22, 24.36, 35.18, None)},
}
NAMES = {"clean": "Clean", "at": "PGD-AT", "trades": "TRADES", "iaat": "IAAT",
         "iaat-trades": "IAAT, TRADES loss"}
EXPORTED = ("at", "trades", "iaat", "iaat-trades")  # shared in RobustBench's formats at the end
# flags the script sets itself, and so refuses in --train-flags and --eval-flags
SET_HERE = {"train": ("--dataset", "--model", "--method", "--loss", "--seed", "--out", "--ema"),
            "eval": ("--surrogate", "--corruptions", "--name", "--checkpoint", "--weights")}

# ---- the expected GPU time ------------------------------------------------------------------
# Forward-equivalents per image (a backward counts as two forwards with weight gradients, one
# without, as in benchmarks/bench.py): a clean step 3; a PGD-10 AT step 10 x 2 + 3 = 23. IAAT
# adds Alg 2's selection attacks: 1.57-1.76x PGD-AT's epoch time in benchmarks/bench.py (CPU,
# digits), so 1.7x. A TRADES step: the clean prediction 1, the KL attack 10 x 2, two forwards
# and their backward 6, the clean batch's second pass (BatchNorm statistics) 1, so 28; IAAT's
# selection (0.7 x 23) on top for IAAT with it.
# Evaluation per test image: PGD-10x5 100, PGD-100x5 1,000, PGD-1000x2 4,000,
# the transfer attack 4,000 on the surrogate, AutoAttack about 4,700 (iaat_eval's estimate).
PASSES = {"clean": 3, "at": 23, "trades": 28, "iaat": 23 * 1.7, "iaat-trades": 28 + 23 * 0.7}
EVAL_PASSES = 100 + 1_000 + 4_000 + 4_000 + 4_700
H100_TF32 = 495e12  # dense TF32 FLOP/s (fp32 convolutions run as TF32 in torch by default)
# assumed share of that peak: small 32x32 convolutions at batch 128 use little of a big GPU
# (CIFAR ResNet-18 training in fp32 commonly runs at 5-20% of the peak); low, central, high
UTILISATION = (0.05, 0.10, 0.20)


def forward_flops(model: str, dataset: str) -> float:
    """FLOPs of one forward pass of one 32x32 image, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    classes = 100 if dataset == "cifar100" else 10
    net = iaat.build_model(model, classes, (0.5,) * 3, (0.25,) * 3).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    return float(counter.get_total_flops())


def measured_images_per_second(model: str) -> tuple[dict, str]:
    """Training images/s on a GPU measured by benchmarks/gpu_check.sh (fp32, PreAct ResNet-18
    only), where its result file exists: ({"iaat": .., "at": ..}, the GPU's name); else {}."""
    path = ROOT / "benchmarks" / "results" / "gpu_check-cuda.json"
    if model != "resnet18" or not path.is_file():
        return {}, ""
    parts = json.loads(path.read_text())["parts"]
    ips = parts.get("bench", {}).get("none", {}).get("images_per_second", {})
    gpu = str(parts.get("environment", {}).get("gpu", "a GPU"))
    return {k: ips[v] for k, v in (("iaat", "iaat"), ("at", "pgd_at")) if v in ips}, gpu


def time_estimate(dataset: str, model: str, cfg: iaat.Config, n_test: int = 10_000,
                  weights: int = 1) -> tuple[float, str]:
    """(central estimate in hours, the explanation) for all of this script's stages;
    `weights`: evaluations per run (2 with --ema: the trained weights and the average)."""
    flops, n_train = forward_flops(model, dataset), cfg.n_train or 50_000
    measured, gpu = measured_images_per_second(model)
    images = n_train * cfg.epochs * len(SEEDS)
    measured_s = sum(images / measured[m] for m in METHODS if m in measured)
    train_flop = sum(images * PASSES[m] * flops for m in METHODS if m not in measured)
    evaluations = len(METHODS) * weights
    eval_flop = evaluations * n_test * EVAL_PASSES * flops  # the evaluations: always estimated

    def hours(utilisation: float) -> float:
        return (measured_s + (train_flop + eval_flop) / (utilisation * H100_TF32)) / 3600
    total, lo, hi = hours(UTILISATION[1]), hours(UTILISATION[2]), hours(UTILISATION[0])
    train_s = measured_s + train_flop / (UTILISATION[1] * H100_TF32)
    eval_s = eval_flop / (UTILISATION[1] * H100_TF32)
    how = [f"{NAMES[m]} training: measured {measured[m]:.0f} images/s on {gpu} "
           "(benchmarks/results/gpu_check-cuda.json)" for m in METHODS if m in measured]
    text = (f"Expected time on one H100: about {total:.0f} h ({train_s / 3600:.0f} h training "
            f"{len(METHODS) * len(SEEDS)} runs of {cfg.epochs} epochs, {eval_s / 3600:.1f} h "
            f"for {evaluations} evaluations), "
            f"{lo:.0f}-{hi:.0f} h at {UTILISATION[2]:.0%}-{UTILISATION[0]:.0%} of the peak.\n"
            + "".join(f"  {line}.\n" for line in how)
            + f"  {'The rest is' if how else 'This is'} an ESTIMATE, not a measurement: "
            f"{flops / 1e9:.2f} GFLOP per {model} forward (torch's FlopCounterMode), attacks "
            f"counted in forward-equivalents, at an assumed {UTILISATION[1]:.0%} of the H100's "
            f"{H100_TF32 / 1e12:.0f} TF32 TFLOP/s.\n  `bash benchmarks/gpu_check.sh` measures "
            "the training throughput. An A100 (156 TF32 TFLOP/s) takes about 3x as long.")
    return total, text


# ---- the stages -----------------------------------------------------------------------------

def run_dir(args, method: str, seed: int) -> Path:
    ema = f"-ema{args.ema:g}" if args.ema else ""
    return args.out / f"{args.dataset}-{args.model}-{method}-seed{seed}{ema}"


def train_argv(args, method: str, seed: int) -> list:
    ema = ["--ema", f"{args.ema:g}"] if args.ema else []
    return ["--dataset", args.dataset, "--model", args.model, *FLAGS[method], "--seed",
            str(seed), *ema, "--out", str(run_dir(args, method, seed)), *args.train_flags]


def weights(args) -> tuple:
    """(weights, the stem of their evaluation files) evaluated for every run."""
    return (("raw", "eval"), ("ema", "eval_ema")) if args.ema else (("raw", "eval"),)


def eval_argv(args, method: str, weights: str = "raw", stem: str = "eval") -> list:
    run, surrogate = run_dir(args, method, 0), run_dir(args, method, 1)
    parts = "whitebox,transfer,autoattack" + (",corruptions" if args.corruptions else "")
    extra = ["--corruptions", str(args.corruptions)] if args.corruptions else []
    return ["eval", str(run), "--surrogate", str(surrogate), "--parts", parts, *extra,
            "--weights", weights, "--name", stem, *args.eval_flags]


def evaluated(run: Path, argv: list, stem: str = "eval") -> bool:
    """Whether RUN/STEM.json is complete, made by `python iaat.py ARGV` (as this script
    recorded in STEM_command.json) on the run's final checkpoint."""
    try:
        res = json.loads((run / f"{stem}.json").read_text())
        made_by = json.loads((run / f"{stem}_command.json").read_text())
        epochs = json.loads((run / "summary.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(res.get("complete")) and res.get("checkpoint_epoch") == epochs and made_by == argv


def export_argv(args, method: str) -> list:
    run = run_dir(args, method, 0)
    return ["export", str(run), str(args.out / f"export-{run.name}")]


def exported(argv: list) -> bool:
    """Whether the folder of `python iaat.py ARGV` holds the export of its run's evaluation,
    written after it."""
    record, evaluation = Path(argv[2]) / "export.json", Path(argv[1]) / "eval.json"
    try:
        return json.loads(record.read_text())["evaluation"] == json.loads(
            evaluation.read_text()) and record.stat().st_mtime_ns > evaluation.stat().st_mtime_ns
    except (OSError, ValueError, KeyError):
        return False


def stage(argv: list, done: bool, log) -> None:
    """`python iaat.py ARGV`, in this process, unless `done`; SystemExit if it fails."""
    command = "python iaat.py " + shlex.join(argv)
    if done:
        log(f"done already: {command}")
        return
    log(f"running: {command}")
    t0 = time.time()
    code = iaat.main(argv)
    if code != 0:
        raise SystemExit(f"reproduce_table1: error: `{command}` failed (exit {code}); fix the "
                         "cause and rerun the same command to resume")
    log(f"finished in {time.time() - t0:.0f} s: {command}")


# ---- the table ------------------------------------------------------------------------------

def ours(res: dict) -> dict:
    """The Table 1 columns of an eval.json, in %."""
    row = {"natural": res["natural"], "transfer": res.get("transfer"),
           "corruptions": (res.get("corruptions") or {}).get("mean"),
           "AutoAttack": res.get("autoattack"), "worst case": res.get("worst_case"),
           **res.get("whitebox", {})}
    return {k: None if v is None else 100 * v for k, v in row.items()}


def table(dataset: str, model: str, results: dict) -> str:
    """Markdown: our row and the paper's per method (and weights: `results` is keyed by method
    or (method, "ema")); '-' where a column was not measured."""
    paper = PAPER.get((dataset, model), {})
    whitebox = dict.fromkeys(k for r in results.values() for k in r.get("whitebox", {}))
    columns = ("natural", *(whitebox or PAPER_COLUMNS[1:4]), "transfer", "corruptions",
               "AutoAttack", "worst case")
    lines = ["| method | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for method in METHODS:
        for who, row in (("ours", ours(results[method]) if method in results else {}),
                         ("weight average, ours", ours(results[method, "ema"])
                          if (method, "ema") in results else None),
                         ("paper", dict(zip(PAPER_COLUMNS, paper.get(method, ()))))):
            if row is None or (who == "paper" and not row):
                continue
            cells = ["-" if row.get(c) is None else f"{row[c]:.2f}" for c in columns]
            lines.append(f"| {NAMES[method]} ({who}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(prog="reproduce_table1", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=("cifar10", "cifar100"))
    p.add_argument("model", choices=("resnet18", "wrn32-10", "smallcnn"),
                   help="the paper's networks (smallcnn: a quick try; the paper has no row)")
    p.add_argument("--out", type=Path, default=Path("runs/table1"), help="where the runs go")
    p.add_argument("--corruptions", type=Path, help="CIFAR-10-C (or -100-C) folder: adds the "
                   "corruption column")
    p.add_argument("--train-flags", type=shlex.split, default=[],
                   help="more iaat.py flags for every run, e.g. \"--data-root /data\"")
    p.add_argument("--eval-flags", type=shlex.split, default=[],
                   help="more `iaat.py eval` flags, e.g. \"--batch-size 1000\"")
    p.add_argument("--ema", type=float, default=0.0, help="every run also keeps a weight "
                   "average with this decay (iaat.py --ema, e.g. 0.999), evaluated too")
    p.add_argument("--estimate", action="store_true", help="print the expected time and stop")
    args = p.parse_args(argv)
    for flags, mine in ((args.train_flags, SET_HERE["train"]), (args.eval_flags, SET_HERE["eval"])):
        taken = [f for f in flags if f.split("=")[0] in mine]
        if taken:
            p.error(f"{taken[0]} is set by this script; choose it with its own arguments")
    return args


def main(argv=None, log=print) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        cfg = iaat.config_from_args(train_argv(args, "iaat", 0))
    except iaat_run.IAATError as err:
        print(f"reproduce_table1: error: {err}", file=sys.stderr)
        return 1
    log(time_estimate(args.dataset, args.model, cfg, weights=len(weights(args)))[1])
    if args.estimate:
        return 0
    for method in METHODS:
        for seed in SEEDS:
            argv = train_argv(args, method, seed)
            stage(argv, iaat_notebook.finished(argv), log)
    results = {}
    for method in METHODS:
        for which, stem in weights(args):
            argv = eval_argv(args, method, which, stem)
            run = Path(argv[1])
            stage(argv, evaluated(run, argv, stem), log)
            iaat_run.write_json(run / f"{stem}_command.json", argv)
            results[method if which == "raw" else (method, which)] = json.loads(
                (run / f"{stem}.json").read_text())
    text = (f"{args.dataset} {args.model}: ours (seed 0; transfer from seed 1) and the paper's "
            f"Table {1 if args.dataset == 'cifar10' else 2}, accuracy in % at eps 8/255\n\n"
            + table(args.dataset, args.model, results) + "\n")
    log("\n" + text)
    path = args.out / f"table-{args.dataset}-{args.model}.md"
    iaat_run.atomic_write(path, lambda p: p.write_text(text))
    log(f"written to {path}")
    for method in EXPORTED:
        argv = export_argv(args, method)
        stage(argv, exported(argv), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
