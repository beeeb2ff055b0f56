"""The copyable core of iaat.py: one contiguous block (PGD with a radius per sample and
Algorithm 2) that runs alone in a file importing only torch and the standard library, and
gives the module's results bit for bit."""
import ast
import re

import pytest
import torch

import iaat
from conftest import ROOT, tiny_cnn

# what the block's banner says a file must import before the pasted block
IMPORTS = ("from contextlib import contextmanager\nfrom typing import Callable, Optional\n"
           "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n")


def core_lines() -> tuple:
    """(first, last) line numbers (1-based) of the block: its banner to 'end of the core'."""
    lines = (ROOT / "iaat.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# THE CORE")) - 1
    end = next(i for i, line in enumerate(lines)
               if line.startswith("# ---") and "end of the core" in line)
    assert lines[start].startswith("# ====")
    return start + 1, end + 1


def core_source() -> str:
    first, last = core_lines()
    return "\n".join((ROOT / "iaat.py").read_text().splitlines()[first - 1:last]) + "\n"


@pytest.fixture(scope="module")
def core():
    """The block pasted alone: executed in a fresh namespace holding only its imports."""
    namespace = {"__name__": "pasted"}
    exec(compile(IMPORTS + core_source(), "pasted.py", "exec"), namespace)
    return namespace


def test_the_block_is_short_and_holds_the_core():
    first, last = core_lines()
    assert last - first + 1 <= 150
    src = core_source()
    for name in ("pgd_attack", "pgd_fooled", "select_epsilon", "input_grad", "model_mode"):
        assert re.search(rf"^def {name}\(", src, re.M), name
    # nothing else of iaat.py: every top-level name the block uses is its own or an import
    tree = ast.parse(IMPORTS + src)
    own = {n.name for n in tree.body if hasattr(n, "name")}
    own |= {"torch", "nn", "F", "contextmanager", "Callable", "Optional"}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    module_names = {k for k in vars(iaat) if not k.startswith("__")}
    assert not (used & module_names) - own, (used & module_names) - own


def test_the_pasted_block_gives_the_modules_results_bit_for_bit(core):
    torch.manual_seed(0)
    model = tiny_cnn(bn=True)
    with torch.no_grad():  # give BatchNorm statistics that are not the defaults
        model.train()(torch.rand(64, 1, 8, 8) * 0.5 + 0.2)
    model.eval()
    x, y = torch.rand(48, 1, 8, 8), torch.randint(0, 10, (48,))
    eps = torch.linspace(0, 0.3, 48)
    results = []
    for fns in (core, vars(iaat)):  # each from the same random numbers
        torch.manual_seed(1)
        adv = fns["pgd_attack"](model, x, y, eps, steps=5, step_size=0.03)
        adv_r = fns["pgd_attack"](model, x, (y + 1) % 10, 0.2, steps=4, restarts=3,
                                  targeted=True, step_size=lambda e: e / 4)
        new_eps = fns["select_epsilon"](model, x, y, torch.full((48,), 0.1), gamma=0.05,
                                        beta=0.1, steps=5, step_size=0.05)
        results.append((adv, adv_r, new_eps))
    for mine, theirs in zip(*results):
        assert torch.equal(mine, theirs)
    assert not torch.equal(results[0][2], torch.full((48,), 0.1))  # Alg 2 moved some radii
    assert core["pgd_attack"] is not iaat.pgd_attack  # the pasted copy really ran


def test_the_pasted_block_runs_in_bf16_autocast(core):
    torch.manual_seed(0)
    model = tiny_cnn(bn=True).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(2)
        ours = core["select_epsilon"](model, x, y, torch.full((16,), 0.1), gamma=0.05, beta=0.1)
        torch.manual_seed(2)
        theirs = iaat.select_epsilon(model, x, y, torch.full((16,), 0.1), gamma=0.05, beta=0.1)
    assert torch.equal(ours, theirs)


def test_the_readme_names_the_blocks_lines():
    first, last = core_lines()
    readme = (ROOT / "README.md").read_text()
    assert f"lines {first}-{last}" in readme, f"README should say: lines {first}-{last}"
    assert f"({last - first + 1} lines)" in readme
