"""The two tiers of the suite (tests/conftest.py): CI's full tier leaves nothing out silently, and
the quick default keeps a short run of every entry point."""
import subprocess
import sys

from conftest import QUICK_NOTEBOOKS, ROOT
from test_notebooks import NOTEBOOKS

# one short end-to-end run of each entry point, and the checks a broken module trips first
QUICK_MUST_HAVE = [
    "tests/test_training.py::test_short_run_writes_every_output",  # python iaat.py
    "tests/test_training.py::test_sigterm_saves_mid_epoch_and_resumes",  # checkpoint and resume
    "tests/test_cli.py::test_corrupt_checkpoint_is_reported_and_kept",
    "tests/test_eval.py::test_eval_cli_runs_the_whole_protocol",  # iaat eval, every part
    "tests/test_radius.py::test_rank_writes_the_runs_images_sorted_by_radius",  # iaat rank
    # imagenet/train.py under torchrun, 2 processes
    "tests/test_imagenet.py::test_two_process_bf16_run_writes_checkpoint_metrics_and_evaluation",
    "tests/test_core_block.py::test_the_pasted_block_is_algorithm_2_and_keeps_the_attack_contract",
    "tests/test_notebooks.py::test_findings_are_asserted_on_digits_and_reported_elsewhere",
]


def collect(*flags) -> set:
    """The test ids `python -m pytest FLAGS` would run (collected only)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0",
                        "-p", "no:cacheprovider", *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return {line.strip() for line in r.stdout.splitlines() if "::" in line}


def files(ids) -> set:
    return {i.split("::")[0] for i in ids}


def test_every_test_file_and_notebook_runs_in_the_full_tier():
    quick, full, everything = collect(), collect("--full"), collect("--full", "-m", "")
    assert quick < full
    test_files = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")
                  if p.name != "conftest.py"}
    # a file pytest does not collect (not named test_*.py, or no test in it) is in neither tier
    assert test_files - {"tests/test_cuda.py"} <= files(full), test_files - files(full)
    # what the full tier leaves out: the cuda tests, which benchmarks/gpu_check.py runs (its CPU
    # smoke run is in the full tier) ...
    left_out = everything - full
    assert {i for i in left_out if i.startswith("tests/")} == \
        {i for i in everything if i.startswith("tests/test_cuda.py")} != set()
    assert "tests/test_gpu_check.py::test_the_cpu_smoke_run_writes_every_section" in full
    # ... and, in this process, the cells of the notebooks outside the quick tier: the full
    # tier's one-thread retrain runs every notebook under strict nbval, in a subprocess
    notebooks = {str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.ipynb")
                 if not {".venv", ".ipynb_checkpoints"} & set(p.parts)}
    assert notebooks == {str(p.relative_to(ROOT)) for p in NOTEBOOKS}  # all in notebooks/
    assert "tests/test_notebooks.py::test_notebooks_pass_strict_nbval_trained_at_one_thread" in full
    assert files(i for i in everything if i.startswith("notebooks/")) == \
        files(i for i in quick if i.startswith("notebooks/")) == \
        {f"notebooks/{n}" for n in QUICK_NOTEBOOKS}


def test_the_quick_tier_runs_each_entry_point_and_leaves_the_slow_tests_out():
    quick, full = collect(), collect("--full")
    missing = [i for i in QUICK_MUST_HAVE if i not in quick]
    assert not missing, missing
    slow = full - quick
    assert "tests/test_notebooks.py::test_notebooks_pass_strict_nbval_trained_at_one_thread" in slow
    assert all(i.startswith("tests/test_distributed.py") for i in full if "distributed" in i)
    assert files(full) - files(quick) == {"tests/test_distributed.py"}  # every other file has quick tests
    # naming a file runs all of it, its slow tests too
    named = collect("tests/test_distributed.py")
    assert named and named == {i for i in full if i.startswith("tests/test_distributed.py")}
