"""benchmarks/gpu_check.py in its CPU smoke mode: every part runs (the `cuda` tests on the CPU
included) and the JSON and markdown summaries hold each of them, so the GPU check cannot rot
on machines without a GPU."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PARTS = ["environment", "cuda_tests", "training", "resume", "bench", "imagenet"]


def test_cuda_tests_count_as_ok_only_when_every_one_ran():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    assert gpu_check.ran_every_test("9 passed in 3.1s") == {"passed": 9}
    for summary in ("9 skipped in 0.1s", "8 passed, 1 skipped in 2.0s", "8 passed, 1 failed",
                    "no tests ran in 0.01s", ""):
        with pytest.raises(RuntimeError, match="did not all run"):
            gpu_check.ran_every_test(summary)


@pytest.mark.slow
def test_the_cpu_smoke_run_writes_every_section(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device",
                        "cpu", "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check-cpu-quick.json").read_text())
    assert list(res["parts"]) == PARTS
    assert all(part["status"] == "ok" for part in res["parts"].values()), res["parts"]
    assert "passed" in res["parts"]["cuda_tests"]["pytest"]  # the cuda tests ran, on the CPU
    assert "skipped" not in res["parts"]["cuda_tests"]["pytest"]
    assert res["parts"]["cuda_tests"]["passed"] >= 5
    runs = res["parts"]["training"]["runs"]
    done = [name for name, run in runs.items() if "skipped" not in run]
    assert len(done) == 5 and all(runs[n]["exit"] == 0 and not runs[n]["missing_outputs"]
                                  for n in done)
    assert res["parts"]["resume"]["final_epoch"] == 3
    assert set(res["parts"]["bench"]) >= {"none", "bf16"}
    assert set(res["parts"]["imagenet"]["images_per_second"]) == {"fp16", "none"}
    text = (tmp_path / "gpu_check-cpu-quick.md").read_text()
    assert all(f"| {part} | ok |" in text for part in PARTS)
    assert r.stdout.endswith("\n" + text + "\n")  # printed as written
