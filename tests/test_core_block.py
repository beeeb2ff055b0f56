"""The copyable core of iaat.py: one contiguous block (PGD with a radius per sample and
Algorithm 2) that runs alone in a file importing only torch and the standard library, and
follows Algorithm 2's closed-form oracle there, in fp32 and in bf16."""
import ast
import re

import numpy as np
import pytest
import torch

import iaat
from conftest import ROOT, tiny_cnn
from test_select_epsilon import GAMMA, STEP, STEPS, _problem_with_prev, alg2_reference

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


def test_the_pasted_block_is_algorithm_2_and_keeps_the_attack_contract(core):
    """The pasted copy, checked against the closed-form oracle of Algorithm 2 (a linear model
    whose distance to the boundary is exact) and the contract of pgd_attack."""
    assert core["pgd_attack"] is not iaat.pgd_attack  # the pasted copy runs, not the module
    model, x, y, d, prev = _problem_with_prev()
    eps = core["select_epsilon"](model, x, y, prev, gamma=GAMMA, beta=1.0, steps=STEPS,
                                 step_size=STEP)
    want = alg2_reference(d.numpy(), prev.numpy(), GAMMA, 1.0)
    np.testing.assert_allclose(eps.numpy(), want, atol=1e-6)
    assert len(np.unique(np.round(want - prev.numpy(), 6))) >= 3  # up, stay and down all occur
    torch.manual_seed(0)
    net = tiny_cnn(bn=True).eval()
    x, y = torch.rand(48, 1, 8, 8), torch.randint(0, 10, (48,))
    radius = torch.linspace(0, 0.3, 48)
    adv = core["pgd_attack"](net, x, y, radius, steps=5, step_size=0.03)
    dist = (adv - x).abs().flatten(1).amax(1)
    assert (dist <= radius + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(adv[0], x[0]) and (dist[1:] > 0).all()  # radius 0: unchanged
    fooled = core["pgd_fooled"](model, *_problem_with_prev()[1:3], d * 1.2, steps=STEPS,
                                step_size=STEP)
    assert fooled.all()  # past the boundary, the pasted PGD always finds the other class


def test_the_pasted_block_runs_in_bf16_autocast(core):
    """Under bf16 autocast the pasted Algorithm 2 still follows the oracle for the images whose
    distance to the boundary is not within bf16's rounding of a candidate radius."""
    model, x, y, d, prev = _problem_with_prev()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eps = core["select_epsilon"](model, x, y, prev, gamma=GAMMA, beta=1.0, steps=STEPS,
                                     step_size=STEP)
    assert eps.dtype == torch.float32
    want = alg2_reference(d.numpy(), prev.numpy(), GAMMA, 1.0)
    agree = np.isclose(eps.numpy(), want, atol=1e-6)
    assert agree.mean() >= 0.9, agree.mean()


def test_the_readme_says_how_to_copy_the_block():
    """The README names the block by its banners (not by line numbers, which move) and lists
    the imports a file needs before it."""
    readme = (ROOT / "README.md").read_text()
    assert "THE CORE" in readme and "end of the core" in readme
    for line in IMPORTS.splitlines():
        assert line in readme, line

