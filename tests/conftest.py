"""Shared helpers: tiny models and data, and a runner for the real CLI in a subprocess."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Training figures move with the CPU thread count (docs/reproducibility.md), and iaat picks its
# count from the machine's load at the start of each run. The suite picks it once, by the same
# rule, and pins it for the runs in this process and in every subprocess, so that runs they
# compare use one count (tests/test_threads.py unpins it where it tests the rule). pytest-xdist's
# workers (`-n`, in pyproject.toml) inherit that count and share it: N workers take 1/N each, at
# least 1, so that their threads never wait on each other's.
if not os.environ.get("OMP_NUM_THREADS"):
    import iaat_run
    os.environ["OMP_NUM_THREADS"] = str(iaat_run.choose_threads()[0])
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("IAAT_SUITE_THREADS"):
    os.environ["IAAT_SUITE_THREADS"] = os.environ["OMP_NUM_THREADS"]  # the whole suite's count
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(os.environ["OMP_NUM_THREADS"]) // workers))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# ===== The two tiers ==========================================================================
# `python -m pytest` runs the quick tier: unit tests of every module, one short run of each entry
# point and notebook 00 under nbval. `python -m pytest --full` (CI) adds every test marked `slow`
# and the other notebooks, which tests/test_notebooks.py retrains at 1 thread under strict nbval.
# Naming files or tests (`python -m pytest tests/test_distributed.py`) runs all of them.
QUICK_NOTEBOOKS = {"00_algorithm_step_by_step.ipynb"}


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the whole suite, as CI runs it: also the tests marked slow and "
                          "notebooks 01-03 (retrained at 1 thread under strict nbval)")


def notebook_of(item):
    """The notebook file name of an nbval cell item; None for any other test."""
    path = Path(str(item.fspath))
    return path.name if path.suffix == ".ipynb" else None


def pytest_collection_modifyitems(config, items):
    """Deselect what the tier leaves out, when pytest collects its testpaths (no files or tests
    named). Notebooks outside QUICK_NOTEBOOKS then never run in this process:
    `test_notebooks_pass_strict_nbval_trained_at_one_thread` (slow) runs them all."""
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    full = config.getoption("--full")
    keep, drop = [], []
    for item in items:
        nb = notebook_of(item)
        if (nb is not None and nb not in QUICK_NOTEBOOKS) or (not full and item.get_closest_marker("slow")):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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


def frozen_linear(dim: int, g: torch.Generator) -> nn.Module:
    """A frozen 2-class linear model f(x) = W x (weights drawn from `g`) on flattened inputs:
    its L-inf distance to the decision boundary inside [0,1] is known in closed form."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(dim, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, dim, generator=g))
        model[1].bias.zero_()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def worst_margin(model, x, y, eps):
    """Closed form for frozen_linear: the smallest logit margin z_y - z_other over the eps-ball
    intersected with [0,1]. Coordinate j moves against v_j = w_y[j] - w_o[j] by min(eps, room
    to the box edge)."""
    w, b = model[1].weight.double(), model[1].bias.double()
    v = (w[y] - w[1 - y])
    xf = x.flatten(1).double()
    room = torch.where(v > 0, xf, 1 - xf)
    eps = torch.as_tensor(eps, dtype=torch.double).expand(len(x))[:, None]
    return (xf * v).sum(1) + (b[y] - b[1 - y]) - (v.abs() * torch.minimum(eps, room)).sum(1)


def distance_to_boundary(model, x, y):
    """For frozen_linear: the exact L-inf distance inside [0,1] (inf if the box holds no other
    class), found by bisection on the closed-form worst margin, which decreases in eps."""
    lo, hi = torch.zeros(len(x), dtype=torch.double), torch.ones(len(x), dtype=torch.double)
    reachable = worst_margin(model, x, y, 1.0) < 0
    for _ in range(60):
        mid = (lo + hi) / 2
        fooled = worst_margin(model, x, y, mid) < 0
        hi, lo = torch.where(fooled, mid, hi), torch.where(fooled, lo, mid)
    return torch.where(reachable, hi, torch.full_like(hi, float("inf"))).float()


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `python iaat.py ARGS` like a user would; return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "iaat.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def write_fake_cifar(root, name, n_train=40, n_test=20, seed=0):
    """Write CIFAR-10 or CIFAR-100 in the layout torchvision reads: pickled dicts of a
    (N, 3072) uint8 array (channel-major rows) and labels. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    names = (["data_batch_%d" % i for i in range(1, 6)], "test_batch") if name == "cifar10" \
        else (["train"], "test")
    written = {}
    splits = [(f, n_train // len(names[0])) for f in names[0]] + [(names[1], n_test)]
    for fname, n in splits:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f, protocol=2)
        written[fname] = (data, labels)
    meta = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(os.path.join(folder, meta[0]), "wb") as f:
        pickle.dump({meta[1]: [f"class{i}" for i in range(classes)]}, f, protocol=2)
    return written


@pytest.fixture
def no_md5(monkeypatch):
    """Our small files cannot match CIFAR's published md5 sums: skip only that comparison."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
