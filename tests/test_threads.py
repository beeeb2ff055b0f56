"""The CPU thread count: the rule that picks it, the /proc/stat reading it rests on, and a run
that records the count it used and keeps it when resumed."""
import json
import os
import subprocess
import sys
import time

import pytest

import iaat_run
from conftest import ROOT


@pytest.mark.parametrize("idle, default, expected", [
    (0.0, 2, 1),    # another torch run keeps both cores busy: one thread, not two that wait
    (1.0, 2, 1),    # a busy loop on one core
    (1.69, 2, 1),   # a core counts as idle from 70%
    (1.7, 2, 2),
    (2.0, 2, 2),    # a quiet machine: torch's default
    (3.9, 2, 2),    # never more than torch's default
    (5.4, 8, 5),
    (None, 4, 4),   # no /proc/stat (not Linux): torch's default
])
def test_the_rule_takes_the_idle_cores_within_torchs_default(monkeypatch, idle, default, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(iaat_run, "idle_cores", lambda: idle)
    monkeypatch.setattr(iaat_run, "TORCH_THREADS", default)
    threads, why = iaat_run.choose_threads()
    assert threads == expected
    assert ("idle" in why) == (idle is not None)


def test_threads_flag_and_omp_num_threads_win(monkeypatch):
    monkeypatch.setattr(iaat_run, "idle_cores", lambda: 0.0)
    assert iaat_run.choose_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert iaat_run.choose_threads() == (iaat_run.TORCH_THREADS, "OMP_NUM_THREADS")
    assert iaat_run.choose_threads(2) == (2, "--threads")


def _proc_stat(*cores):
    """/proc/stat's text with the cpu rows of `cores`, each (busy, idle) jiffies: user holds the
    busy time and idle the idle time; the other six columns stay 0."""
    rows = [f"cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0" for n, (busy, idle) in enumerate(cores)]
    total = [sum(c[0] for c in cores), sum(c[1] for c in cores)]
    return "\n".join([f"cpu  {total[0]} 0 0 {total[1]} 0 0 0 0 0 0", *rows, "intr 1 2 3", ""])


@pytest.mark.parametrize("before, after, affinity, expected", [
    # two cores: one busy for the whole second (100 jiffies), one idle
    ([(0, 0), (0, 0)], [(100, 0), (0, 100)], {0, 1}, 1.0),
    ([(500, 10), (7, 900)], [(550, 60), (57, 950)], {0, 1}, 1.0),  # half of each core busy
    ([(0, 0), (0, 0)], [(0, 100), (0, 100)], {0, 1}, 2.0),
    ([(0, 0), (0, 0), (0, 0)], [(100, 0), (25, 75), (0, 100)], {1, 2}, 1.75),  # cpu0 not ours
])
def test_idle_cores_reads_two_snapshots_of_proc_stat(monkeypatch, before, after, affinity,
                                                      expected):
    """A fixed /proc/stat, so the answer cannot depend on this machine's load or size."""
    import io
    snapshots = iter([_proc_stat(*before), _proc_stat(*after)])
    monkeypatch.setattr(iaat_run, "open", lambda path: io.StringIO(next(snapshots)), raising=False)
    monkeypatch.setattr(iaat_run.os, "sched_getaffinity", lambda pid: affinity)
    monkeypatch.setattr(iaat_run.time, "sleep", lambda seconds: None)
    assert iaat_run.idle_cores() == pytest.approx(expected)


def test_idle_cores_is_none_where_it_cannot_tell(monkeypatch):
    def unreadable(path):
        raise FileNotFoundError(path)
    monkeypatch.setattr(iaat_run, "open", unreadable, raising=False)
    assert iaat_run.idle_cores(0) is None


def _train(out, *flags):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the automatic choice
    return subprocess.run([sys.executable, str(ROOT / "iaat.py"), "--n-train", "128",
                           "--eval-subset", "50", "--warmup", "1", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_a_run_records_its_thread_count_and_a_resume_keeps_it(tmp_path):
    first = _train(tmp_path, "--epochs", "1", "--threads", "1")
    assert first.returncode == 0, first.stderr
    assert "1 CPU thread (--threads)" in first.stdout
    assert json.loads((tmp_path / "config.json").read_text())["threads"] == 1
    # resumed without --threads: the count the run started with, whatever the machine's load
    second = _train(tmp_path, "--epochs", "2")
    assert second.returncode == 0, second.stderr
    assert "1 CPU thread (as before)" in second.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["threads"] == 1


def test_the_neighbour_benchmark_runs_and_prints_its_table(tmp_path):
    """benchmarks/busy_cpu.py (the figures in benchmarks/README.md) on a trivial command."""
    out = tmp_path / "busy.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "busy_cpu.py"), "--neighbours",
                           "none,python", "--json", str(out), "--",
                           sys.executable, "-c", "'import os, sys; os.makedirs(sys.argv[1])'", "{out}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| python |" in done.stdout and "x |" in done.stdout  # the table, with its ratios
    times = json.loads(out.read_text())["times"]
    assert len(times["none"]) == len(times["python"]) == 1 and times["python"][0] > 0
