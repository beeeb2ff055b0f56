"""Stress the multi-process paths where races hide: a torchrun job whose rank is
SIGKILLed and restarted (--max-restarts 1), and a run resumed with more processes, repeated
many times, optionally beside a CPU load. Prints one line per run and a summary.

    python scripts/stress_restarts.py --repeats 10                   # every scenario, 10 times
    python scripts/stress_restarts.py --repeats 10 --load            # beside a torch matmul loop
    python scripts/stress_restarts.py --scenarios kill-epoch-end --repeats 20
    python scripts/stress_restarts.py --root ../older-checkout       # another iaat.py

Scenarios (the digits preset, 600 images, 6 epochs, warmup 2, 2 gloo processes on CPU):
  kill-warmup      rank 1 killed mid-epoch during warmup (epoch 1)
  kill-mid-epoch   rank 1 killed mid-epoch after warmup (epoch 4)
  kill-epoch-end   rank 1 killed right after an epoch's metrics line appears (epoch 3)
  kill-rank0       rank 0 killed mid-epoch after warmup (epoch 4)
  resume-1-to-2    3 epochs in one process, then the rest with 2 processes

A run passes when the job exits 0 and its last checkpoint is complete: epoch 6, every image's
eps updated once per epoch after warmup (4 times), equal on both processes.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--epochs", "6", "--warmup", "2", "--n-train", "600", "--batch-size", "64",
        "--eval-subset", "200", "--eval-steps", "5", "--save-every", "3"]
KILLS = {"kill-warmup": (1, 1, "mid"), "kill-mid-epoch": (1, 4, "mid"),
         "kill-epoch-end": (1, 3, "end"), "kill-rank0": (0, 4, "mid")}
SCENARIOS = (*KILLS, "resume-1-to-2")
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
SCRIPT = ROOT / "iaat.py"  # --root sets another checkout's


def torchrun(out: Path, args=ARGS, nproc: int = 2, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "--max-restarts", "1", str(SCRIPT), *args,
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    return proc.communicate(timeout=900) + (proc.returncode,) if wait else proc


def worker_pid(out: Path, rank: int):
    """The PID of the worker of `rank` training into `out` (from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmdline and b"torch.distributed.run" not in cmdline \
                and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def wait_for(condition, proc, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the job ended (or hung) before the kill point")
        time.sleep(0.01)


def kill_run(out: Path, rank: int, epoch: int, where: str) -> tuple:
    """Start the job, SIGKILL `rank` in `epoch` (1-based), mid-epoch or just after its end."""
    proc = torchrun(out, wait=False)
    metrics, ckpt = out / "metrics.jsonl", out / "checkpoint.pt"
    done = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    if where == "end":
        wait_for(lambda: done() >= epoch, proc)
    else:  # a mid-epoch checkpoint (--save-every 3) of that epoch, then a little more
        wait_for(lambda: done() >= epoch - 1 and ckpt.exists() and
                 torch.load(ckpt, weights_only=True)["step"] > 0, proc)
    wait_for(lambda: worker_pid(out, rank) is not None, proc, 30)
    os.kill(worker_pid(out, rank), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=900)
    return stdout, stderr, proc.returncode


def resume_run(out: Path) -> tuple:
    first = [a if a != "6" else "3" for a in ARGS]
    r = subprocess.run([sys.executable, str(SCRIPT), *first, "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=900)
    if r.returncode:
        return r.stdout, r.stderr, r.returncode
    return torchrun(out)


def complete(out: Path) -> str:
    """'' if the final checkpoint is complete, else what is wrong with it."""
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    if (ckpt["epoch"], ckpt["step"]) != (6, 0):
        return f"ended at epoch {ckpt['epoch']} step {ckpt['step']}"
    if not bool((ckpt["eps_visits"] == 4).all()):
        return f"eps updates per image {ckpt['eps_visits'].min()}-{ckpt['eps_visits'].max()}"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose iaat.py runs")
    p.add_argument("--load", action="store_true", help="run a torch matmul loop at torch's "
                   "default threads beside the jobs (another training run, say)")
    args = p.parse_args()
    global SCRIPT
    SCRIPT = args.root.resolve() / "iaat.py"
    ENV["PYTHONPATH"] = str(args.root.resolve())
    load = subprocess.Popen([sys.executable, "-c", "import torch\nx = torch.rand(512, 512)\n"
                             "while True: x = (x @ x).tanh()"]) if args.load else None
    failures = {s: 0 for s in args.scenarios}
    try:
        for i in range(args.repeats):
            for name in args.scenarios:
                with tempfile.TemporaryDirectory() as tmp:
                    out, t0 = Path(tmp) / "run", time.time()
                    stdout, stderr, code = (resume_run(out) if name == "resume-1-to-2"
                                            else kill_run(out, *KILLS[name]))
                    problem = f"exit {code}" if code else complete(out)
                    aborts = stderr.count("terminate called")
                    failures[name] += bool(problem)
                    print(f"{name:15s} run {i + 1}: {'FAIL ' + problem if problem else 'ok'}"
                          f" ({time.time() - t0:.0f} s, 'terminate called' x{aborts})", flush=True)
                    if problem:
                        print("\n".join(line for line in stderr.splitlines()
                                        if "rror" in line or "terminate" in line)[-2000:])
    finally:
        if load is not None:
            load.kill()
    print("failures:", ", ".join(f"{k} {v}/{args.repeats}" for k, v in failures.items()))
    return int(any(failures.values()))


if __name__ == "__main__":
    sys.exit(main())
