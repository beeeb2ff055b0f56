"""torchrun on CPU with gloo, 2 processes, digits: one consistent eps memory, exact metrics,
resume across process counts, and a rank killed under --max-restarts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # the full tier: torchrun's start-up is most of each test

ARGS = ["--epochs", "6", "--warmup", "2", "--n-train", "600", "--batch-size", "64",
        "--eval-subset", "200", "--eval-steps", "5"]
UPDATES = 6 - 2  # Alg 2 updates of every sample: once per epoch after warmup


def torchrun(*args, nproc=2, extra=(), timeout=600, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *extra, str(ROOT / "iaat.py"), *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONFAULTHANDLER="1")  # a process that aborts prints its threads' stacks
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    r = torchrun(*ARGS, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    r = run_cli(*ARGS, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_memory_identical_on_both_ranks_and_updated_once_per_epoch(two):
    out, r = two
    s = summary(out)
    assert s["processes"] == 2
    digests = s["eps_memory_sha1_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    models = s["model_sha1_per_process"]  # weights and BatchNorm statistics
    assert len(models) == 2 and models[0] == models[1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    visits = ckpt["eps_visits"]
    assert len(visits) == 600 and torch.all(visits == UPDATES)  # no sample twice, none missed
    assert ckpt["eps_memory"].std() > 0  # Alg 2 did move the radii
    assert s["eps_updates_per_sample"] == [UPDATES, UPDATES]


def test_only_rank_zero_writes_and_logs(two):
    out, r = two
    assert r.stdout.count("final digits smallcnn iaat") == 1
    assert sum(line.startswith("epoch ") for line in r.stdout.splitlines()) == 6
    assert not list(out.glob(".*.tmp*"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "checkpoint.pt", "config.json", "curves.png", "eps_hist.png", "eps_history.npy",
         "eps_mean.png", "metrics.jsonl", "summary.json"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(row["images"] == 600 for row in rows)  # training sums over both ranks, once


def test_reported_accuracy_is_that_of_the_saved_model(two):
    """The summary's natural accuracy (sharded, summed over ranks) equals what one process
    gets from the checkpoint alone: the ranks evaluated one model with rank 0's BN buffers."""
    import iaat
    out, _ = two
    data = iaat.load_digits(0)
    model = iaat.build_model("smallcnn", 10, data.mean, data.std)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    acc = iaat.evaluate(model, data.test_x, data.test_y, eps=0.0, steps=1, step_size=0.0)
    assert acc["clean"] == summary(out)["natural_acc"]


def test_trades_loss_and_weight_average_under_torchrun(tmp_path):
    """IAAT with the TRADES loss (two forward passes per step through DDP) and a weight
    average: both processes end with the same model and average (finish checks it), and the
    average evaluated at the end is the one saved."""
    out = tmp_path / "run"
    r = torchrun("--epochs", "2", *ARGS[4:], "--warmup", "1", "--loss", "trades", "--ema",
                 "0.9", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert s["processes"] == 2 and s["loss"] == "trades"
    assert len(set(s["model_sha1_per_process"])) == 1
    r = run_cli("eval", out, "--parts", "whitebox", "--whitebox", "2x1", "--weights", "ema")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "eval_ema.json").read_text())["natural"] == \
        pytest.approx(s["ema_natural_acc"])


def test_batch_smaller_than_the_processes_is_refused(tmp_path):
    r = torchrun("--epochs", "1", "--n-train", "64", "--batch-size", "1", "--out", tmp_path / "r")
    assert r.returncode != 0
    assert "--batch-size 1 is smaller than the 2 processes" in r.stderr


def test_accuracy_in_the_range_of_one_process(two, one):
    s2, s1 = summary(two[0]), summary(one)
    assert s1["processes"] == 1 and s2["processes"] == 2
    assert s1["natural_acc"] > 0.5 and s2["natural_acc"] > 0.5  # both learnt something
    assert abs(s2["natural_acc"] - s1["natural_acc"]) < 0.1
    assert abs(s2["pgd_acc"] - s1["pgd_acc"]) < 0.1


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(tmp_path, first, second):
    out = tmp_path / "run"
    short = [a if a != "6" else "3" for a in ARGS]  # the same run, stopped after 3 epochs
    launch = lambda n, args: torchrun(*args, "--out", out, nproc=n) if n > 1 else \
        run_cli(*args, "--out", out)  # noqa: E731
    r = launch(first, short)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
    r = launch(second, ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "at epoch 3 step 0" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["images"] == 600 for row in rows)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 6 and torch.all(ckpt["eps_visits"] == UPDATES)
    assert summary(out)["processes"] == second
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5, 6]


def _errors(stderr: str) -> str:
    """Every worker's error lines (each attempt's), then the tail: enough to tell which rank
    failed first and why, which the tail alone does not show."""
    lines = [line for line in stderr.splitlines()
             if "Error" in line or "error:" in line or "terminate" in line]
    return "\n".join(lines[-40:]) + "\n---- tail ----\n" + stderr[-1500:]


def _worker_pid(out, rank):
    """The PID of the torchrun worker of `rank` training into `out` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmdline and f"RANK={rank}".encode() in environ \
                and b"iaat.py" in b" ".join(cmdline) and b"torch.distributed.run" not in b" ".join(cmdline):
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_killed_rank_restarts_and_resumes_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    # one restart must do: the job ends with a barrier before any process tears down gloo
    # (scripts/stress_restarts.py repeats this and other kill points)
    proc = torchrun(*ARGS, "--save-every", "3", "--out", out, extra=["--max-restarts", "1"],
                    wait=False)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        # kill rank 1 in epoch 4, after warmup: selection and the memory all-gather are live
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    pid = _worker_pid(out, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, _errors(stderr)
    resumed = [line for line in stdout.splitlines() if line.startswith("resuming")]
    assert resumed, stdout  # the restarted workers picked up the checkpoint
    at_epoch = int(resumed[0].split(" at epoch ")[1].split()[0])
    assert at_epoch >= 2  # after warmup (epochs 0 and 1)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 6 and ckpt["step"] == 0
    assert len(ckpt["eps_memory"]) == 600 and torch.all(ckpt["eps_visits"] == UPDATES)
    assert torch.isfinite(ckpt["eps_memory"]).all() and summary(out)["processes"] == 2


def test_held_out_check_and_best_checkpoint_under_torchrun(tmp_path):
    """--val-size with 2 processes: the held-out accuracy is counted over both shards (exact:
    it equals one process's count with the saved weights; 61 images make shards of 31 and 30,
    where a mean of the two means would differ), and rank 0 keeps best.pt."""
    import iaat
    import iaat_eval
    out = tmp_path / "run"
    r = torchrun("--epochs", "3", "--warmup", "1", "--n-train", "300", "--val-size", "61",
                 "--eval-subset", "0", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda row: row["val_pgd"])
    model, _, data, epoch = iaat_eval.load_run(out, checkpoint="best")
    assert epoch == best["epoch"] == summary(out)["best_epoch"]
    acc = iaat.evaluate(model, data.val_x, data.val_y, eps=0.0, steps=1, step_size=0.0)
    assert len(data.val_y) == 61 and acc["clean"] == best["val_clean"]
    assert all(abs(row[k] * 61 - round(row[k] * 61)) < 1e-9 for row in rows
               for k in ("val_clean", "val_pgd"))
