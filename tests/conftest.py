"""Shared helpers: tiny models and data, and a runner for the real CLI in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Training figures move with the CPU thread count (README, Reproducibility), and iaat picks its
# count from the machine's load at the start of each run. The tests pick it once, by the same
# rule, and pin it for the runs in this process and in every subprocess, so that runs they
# compare use one count (tests/test_threads.py unpins it where it tests the rule).
if not os.environ.get("OMP_NUM_THREADS"):
    import iaat_run
    os.environ["OMP_NUM_THREADS"] = str(iaat_run.choose_threads()[0])
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two short PGD-AT digits runs (seeds 0 and 1): a model and an independent surrogate
    (shared by test_eval.py and test_autoattack.py: trained once per session)."""
    import iaat
    root = tmp_path_factory.mktemp("runs")
    for seed, epochs in ((0, 8), (1, 3)):
        cfg = iaat.make_config("digits", method="at", seed=seed, epochs=epochs, eps_w=0.1,
                               lr_milestones=(6, 7), eval_subset=50, out=str(root / f"s{seed}"))
        iaat.train(cfg, log=lambda msg: None)
    return root / "s0", root / "s1"


@pytest.fixture(scope="session")
def trained(runs):
    """The seed-0 run's model (eval mode), its test images in [0,1] and labels."""
    import iaat
    import iaat_eval
    model, cfg, data, epoch = iaat_eval.load_run(runs[0], torch.device("cpu"))
    assert epoch == cfg.epochs == 8
    return model, iaat.to_float(data.test_x), data.test_y


def tiny_cnn(num_classes=10, in_ch=1, bn=True):
    """A small conv net with BatchNorm (so train/eval mode matters) in front of a linear head."""
    layers = [nn.Conv2d(in_ch, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes)]
    model = nn.Sequential(*layers)
    model(torch.rand(2, in_ch, 8, 8))  # materialise the lazy layer
    return model


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `python iaat.py ARGS` like a user would; return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "iaat.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
