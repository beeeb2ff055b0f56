"""Wall time of a command on a quiet CPU and beside a CPU-bound neighbour process.

    python benchmarks/busy_cpu.py -- python iaat.py --epochs 3 --warmup 1 --out {out}
    python benchmarks/busy_cpu.py --neighbours none,torch --repeats 3 -- python iaat.py --out {out}

For each neighbour in turn (the order repeats --repeats times) it starts the neighbour, waits a
second, runs the command through the shell with `{out}` replaced by a fresh empty folder,
records the wall time, and stops the neighbour. The neighbours:

- none: nothing else runs (measure this on an otherwise quiet machine);
- python: a pure-Python busy loop, `while True: pass` (one core, no threads);
- torch: a loop of 512x512 float32 matmuls at torch's default thread count, as another
  training run or a test suite would be.

It prints a markdown table: every time, the median per neighbour, and the median against the
quiet median of the same run. `--json FILE` writes the same numbers.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

NEIGHBOURS = {
    "none": None,
    "python": "while True: pass",
    "torch": "import torch\nx = torch.randn(512, 512)\nwhile True: x = (x @ x).tanh_()",
}


def run_once(command: str, neighbour: str) -> float:
    out = tempfile.mkdtemp(prefix="busy_cpu-")
    shutil.rmtree(out)  # the command makes it: a fresh run folder
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user has it
    proc = None
    if NEIGHBOURS[neighbour]:
        proc = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[neighbour]], env=env)
        time.sleep(1.0)  # let it get going (torch's import alone takes a second or two)
    try:
        t0 = time.perf_counter()
        done = subprocess.run(command.replace("{out}", out), shell=True, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(out, ignore_errors=True)
    if done.returncode:
        sys.exit(f"busy_cpu: the command failed ({done.returncode}):\n{done.stdout[-2000:]}")
    threads = [line for line in done.stdout.splitlines() if "CPU thread" in line]
    print(f"  {neighbour:6s} {seconds:7.1f} s  {threads[0] if threads else ''}", flush=True)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neighbours", default="none,python,torch",
                   help="comma-separated, from: " + ", ".join(NEIGHBOURS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command; {out}: a fresh folder")
    args = p.parse_args(argv)
    command = " ".join(args.command[1:] if args.command[:1] == ["--"] else args.command)
    neighbours = args.neighbours.split(",")
    if not command or any(n not in NEIGHBOURS for n in neighbours):
        p.error("give known --neighbours and a command after --")
    times = {n: [] for n in neighbours}
    print(f"busy_cpu: {command}\n  {os.cpu_count()} CPUs, repeats {args.repeats}", flush=True)
    for _ in range(args.repeats):
        for n in neighbours:
            times[n].append(run_once(command, n))
    quiet = statistics.median(times["none"]) if times.get("none") else None
    print("\n| neighbour | wall times (s) | median (s) | median / quiet |\n| --- | --- | --- | --- |")
    for n, ts in times.items():
        ratio = f"{statistics.median(ts) / quiet:.2f}x" if quiet else "-"
        print(f"| {n} | {', '.join(f'{t:.1f}' for t in ts)} | {statistics.median(ts):.1f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "cpus": os.cpu_count(), "times": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
