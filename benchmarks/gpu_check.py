"""One command that says, in minutes, whether everything GPU-only still works and how fast it is.

    bash benchmarks/gpu_check.sh                    # on a CUDA machine: about 6-8 min on one H100
    python benchmarks/gpu_check.py --device cpu --quick   # the smoke test CI runs (~1-2 min)

Parts, each timed and reported as ok, failed or skipped (with the reason):
  environment     torch, CUDA, the GPU, and which optional packages are importable
  cuda_tests      pytest -m cuda: the tests that need a GPU (the suite's default command
                  deselects them on every machine; here they run on --device, CPU included, so
                  they cannot rot); ok only if every one ran and passed, none skipped
  training        short IAAT and PGD-AT runs of `iaat.py` on synthetic CIFAR-10 files (written
                  in torchvision's real on-disk format): fp32, bf16, fp16 with its loss
                  scaling, channels_last, torch.compile; every output file checked
  resume          a run stopped by SIGTERM mid-epoch (exit 143) and resumed to the end
  bench           benchmarks/bench.py, PreAct ResNet-18 on synthetic data, fp32 and bf16: the
                  three ratios, images/s and the model-FLOP utilisation
  imagenet        benchmarks/imagenet_throughput.py, ResNet-50, fp16 against fp32

Writes benchmarks/results/gpu_check-<device>.json and .md (--out to choose) and prints the
markdown. Exit status 0 when no part failed. Runs on the machine's own torch, offline; a part
whose package is missing (torchattacks for bench, say) is skipped and says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("environment", "cuda_tests", "training", "resume", "bench", "imagenet")
OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "eps_history.npy", "summary.json", "config.json",
           "curves.png", "eps_hist.png", "eps_mean.png")
OPTIONAL = ("torchvision", "torchattacks", "sklearn", "matplotlib", "tqdm", "pytest", "nbval")
# `python iaat.py FLAGS`, except that torchvision's md5 comparison is skipped: the synthetic
# files cannot match CIFAR's published sums (the tests do the same; nothing else changes)
IAAT = ["-c", "import os, runpy, sys; import torchvision.datasets.cifar as c; "
        "c.check_integrity = lambda path, md5=None: os.path.isfile(path); "
        "sys.argv = ['iaat.py', *sys.argv[1:]]; runpy.run_path('iaat.py', run_name='__main__')"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and a small CNN: the CPU smoke test of this script")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder of gpu_check-<device>.json and .md")
    return p.parse_args(argv)


def run(cmd, timeout: float, env=None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT, **kw)


def tail(text: str, n: int = 1500) -> str:
    return text[-n:]


# ============================================================================================
# The parts
# ============================================================================================

def environment(args) -> dict:
    import torch
    res = {"torch": torch.__version__, "python": platform.python_version(),
           "cuda_available": torch.cuda.is_available(), "device": args.device,
           "missing": [m for m in OPTIONAL if importlib.util.find_spec(m) is None]}
    if torch.cuda.is_available():
        res.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   gpus=torch.cuda.device_count(),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    return res


def cuda_tests(args) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "why": "pytest is not installed"}
    r = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
             "-o", "addopts=", "tests/test_cuda.py"], 600, env={"IAAT_TEST_DEVICE": args.device})
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0:
        raise RuntimeError(f"pytest exit {r.returncode}: {summary}\n{tail(r.stdout + r.stderr)}")
    return {"pytest": summary, **ran_every_test(summary)}


def ran_every_test(summary: str) -> dict:
    """{"passed": n} from pytest's closing line; RuntimeError unless every test ran and passed:
    a cuda test skipped (no CUDA, say) checked nothing, so the part is not ok."""
    import re
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|error)", summary)}
    if not counts.get("passed") or set(counts) - {"passed"}:
        raise RuntimeError(f"the cuda tests did not all run and pass: {summary or 'no summary'}")
    return {"passed": counts["passed"]}


def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random CIFAR-10 in torchvision's layout: cifar-10-batches-py/data_batch_1..5, test_batch
    and batches.meta, pickled dicts of uint8 rows (N, 3072) and labels; learnable classes (each
    has its own mean colour), so accuracy shows that training works."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def images(n):
        labels = rng.integers(0, 10, n)
        colour = (np.arange(10)[:, None] * np.array([25, 70, 115]) % 256)[labels]  # (n, 3)
        x = np.clip(colour[:, :, None] + rng.normal(0, 50, (n, 3, 1024)), 0, 255)
        return x.astype(np.uint8).reshape(n, 3072), labels.tolist()
    per = -(-n_train // 5)
    for b in range(5):
        data, labels = images(per)
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    data, labels = images(n_test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def train_args(args, data: Path) -> list:
    model = ["--model", "smallcnn"] if args.quick else ["--model", "resnet18"]
    sizes = (["--n-train", "96", "--batch-size", "32", "--attack-steps", "2", "--eval-subset",
              "16", "--eval-steps", "2", "--eval-batch", "64"] if args.quick else
             ["--n-train", "2048", "--batch-size", "256", "--attack-steps", "5", "--eval-subset",
              "256", "--eval-steps", "5"])
    return ["--dataset", "cifar10", *model, "--data-root", data, "--no-download", "--device",
            args.device, "--epochs", "2", "--warmup", "1", "--plot-every", "1", *sizes]


VARIANTS = {  # name: extra flags of iaat.py
    "iaat fp32": ["--channels-last", "off"],
    "iaat bf16": ["--amp", "bf16"],
    "iaat fp16": ["--amp", "fp16"],
    "iaat fp16 channels_last": ["--amp", "fp16", "--channels-last", "on"],
    "pgd-at fp32": ["--method", "at"],
    "iaat bf16 compile": ["--amp", "bf16", "--compile"],
}


def training(args, data: Path, work: Path) -> dict:
    variants = {k: v for k, v in VARIANTS.items() if not (args.quick and "compile" in k)}
    runs, failed = {}, []
    for name, flags in variants.items():
        out, t0 = work / name.replace(" ", "-"), time.time()
        r = run([sys.executable, *IAAT, *train_args(args, data), *flags, "--out", out], 900)
        missing = [f for f in OUTPUTS if not (out / f).is_file()]
        entry = {"exit": r.returncode, "seconds": round(time.time() - t0, 1),
                 "missing_outputs": missing}
        if r.returncode == 0 and not missing:
            s = json.loads((out / "summary.json").read_text())
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            entry.update(natural=s["natural_acc"], pgd=s["pgd_acc"],
                         eps_mean_255=s["eps_mean_255"],
                         images_per_second=rows[-1]["images_per_second"])
        else:
            entry["error"] = tail(r.stderr, 800)
            failed.append(name)
        runs[name] = entry
    if args.quick:
        runs["iaat bf16 compile"] = {"skipped": "--quick (compiling takes minutes on a CPU)"}
    if failed:
        raise RuntimeError(f"failed: {', '.join(failed)}", runs)
    return {"runs": runs}


def resume(args, data: Path, work: Path) -> dict:
    out = work / "resume"
    cmd = [sys.executable, *IAAT, *train_args(args, data), "--epochs", "3", "--save-every",
           "1", "--out", out]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 600
    while not (out / "checkpoint.pt").exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"no checkpoint before the run ended: {tail(proc.communicate()[1])}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode != 143 or "SIGTERM: checkpoint saved" not in stdout:
        raise RuntimeError(f"SIGTERM gave exit {proc.returncode}: {tail(stderr)}")
    import torch
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)
    r = run(cmd, 900)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    if r.returncode != 0 or "resuming" not in r.stdout or [x["epoch"] for x in rows] != [1, 2, 3]:
        raise RuntimeError(f"resume gave exit {r.returncode}: {tail(r.stderr)}")
    return {"stopped_at": [stopped["epoch"], stopped["step"]],
            "final_epoch": json.loads((out / "summary.json").read_text())["epochs"]}


# peak dense TFLOP/s by GPU and precision (fp32 convolutions run as TF32 by default in torch)
PEAK = {"H100": {"bf16": 989, "none": 495}, "H200": {"bf16": 989, "none": 495},
        "A100": {"bf16": 312, "none": 156}}


def bench(args, work: Path) -> dict:
    if importlib.util.find_spec("torchattacks") is None:
        return {"status": "skipped", "why": "torchattacks is not installed (its PGD is figure "
                "1's reference); pip install it from a carried wheel to run this part"}
    import torch
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else ""
    peak = next((v for k, v in PEAK.items() if k in gpu), {})
    out = {}
    for amp in ("none", "bf16"):
        path = work / f"bench-{amp}.json"
        cmd = [sys.executable, "benchmarks/bench.py", "--device", args.device, "--data",
               "synthetic", "--amp", amp, "--json", path]
        cmd += (["--quick", "--batch", "32", "--n-images", "64"] if args.quick else
                ["--model", "resnet18", "--n-images", "2560", "--warm-steps", "20", "--repeats", "3"])
        cmd += ["--peak-tflops", str(peak[amp])] if amp in peak else []
        r = run(cmd, 900)
        if r.returncode != 0:
            raise RuntimeError(f"bench --amp {amp}: exit {r.returncode}: {tail(r.stderr)}")
        res = json.loads(path.read_text())
        out[amp] = {"figures": {k: v["ratio"] for k, v in res["figures"].items()},
                    "images_per_second": {k: v["images_per_s"] for k, v in res["epochs"].items()},
                    "mfu": res.get("mfu"), "command": shlex.join(map(str, cmd[1:]))}
    return out


def imagenet(args, work: Path) -> dict:
    path = work / "imagenet.json"
    cmd = [sys.executable, "benchmarks/imagenet_throughput.py", "--device", args.device,
           "--json", path] + (["--quick"] if args.quick else ["--arch", "resnet50"])
    r = run(cmd, 900)
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {tail(r.stderr)}")
    res = json.loads(path.read_text())
    return {k: res[k] for k in ("arch", "batch", "image_size", "attack_steps",
                                "images_per_second", "fp16_speedup_over_fp32") if k in res}


# ============================================================================================
# The report
# ============================================================================================

def markdown(res: dict) -> str:
    env = res["parts"].get("environment", {})
    lines = [f"# GPU check: {env.get('gpu', res['device'])}", "",
             f"`{res['command']}`, torch {env.get('torch')}, CUDA {env.get('cuda', '-')}, "
             f"{res['wall_s']:.0f} s in all" + (" (--quick)" if res["quick"] else ""), "",
             "| part | status | seconds | result |", "| --- | --- | --- | --- |"]
    for name, part in res["parts"].items():
        shown = {k: v for k, v in part.items() if k not in ("status", "seconds", "runs")}
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '-')} | "
                     f"{json.dumps(shown)[:300]} |")
    runs = res["parts"].get("training", {}).get("runs", {})
    if runs:
        lines += ["", "| training run | exit | s | natural | PGD | mean eps /255 | img/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in runs.items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} | | | | | |")
                continue
            cells = [r.get(k) for k in ("natural", "pgd", "eps_mean_255", "images_per_second")]
            lines.append(f"| {name} | {r['exit']} | {r['seconds']} | " + " | ".join(
                "-" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c)
                for c in cells) + " |")
    if env.get("missing"):
        lines += ["", f"Not installed: {', '.join(env['missing'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    t_start, parts = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        work, data = Path(tmp), Path(tmp) / "cifar"
        write_cifar10(data, 512 if args.quick else 2560, 64 if args.quick else 512)
        steps = {"environment": lambda: environment(args), "cuda_tests": lambda: cuda_tests(args),
                 "training": lambda: training(args, data, work),
                 "resume": lambda: resume(args, data, work), "bench": lambda: bench(args, work),
                 "imagenet": lambda: imagenet(args, work)}
        for name in args.parts:
            t0 = time.time()
            try:
                part = {"status": "ok", **steps[name]()}
            except Exception as err:  # a failed part is reported, and the others still run
                part = {"status": "failed", "error": str(err.args[0])[:2000]}
                if len(err.args) > 1:
                    part["runs"] = err.args[1]
            part.setdefault("status", "ok")
            part["seconds"] = round(time.time() - t0, 1)
            parts[name] = part
            print(f"gpu_check: {name}: {part['status']} ({part['seconds']} s)", flush=True)
    res = {"command": "python " + shlex.join(["benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
           "device": args.device, "quick": args.quick, "parts": parts,
           "wall_s": round(time.time() - t_start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_check-{args.device}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    stem.with_suffix(".md").write_text(text)
    print("\n" + text)
    return int(any(p["status"] == "failed" for p in parts.values()))


if __name__ == "__main__":
    sys.exit(main())
