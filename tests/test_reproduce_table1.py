"""scripts/reproduce_table1.sh end to end on CPU: tiny runs on small files in CIFAR's format."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_fake_cifar

spec = importlib.util.spec_from_file_location("reproduce_table1",
                                              ROOT / "scripts" / "reproduce_table1.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

TINY_TRAINING = ("--no-download --epochs 2 --warmup 1 --n-train 40 --batch-size 20 "
                 "--attack-steps 2 --eval-subset 0 --eval-steps 2")
TINY_EVAL = "--n-examples 10 --whitebox 2x1 --transfer 2x1"


def test_reproduce_table1_end_to_end_and_resumed(tmp_path, no_md5):
    write_fake_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=20)
    argv = ["cifar10", "smallcnn", "--out", str(tmp_path / "runs"), "--train-flags",
            f"--data-root {tmp_path / 'data'} {TINY_TRAINING}", "--eval-flags", TINY_EVAL]
    lines = []
    assert reproduce.main(argv, log=lines.append) == 0
    assert "ESTIMATE" in lines[0]
    methods = ("clean", "at", "trades", "iaat", "iaat-trades")
    runs = {(m, s): tmp_path / "runs" / f"cifar10-smallcnn-{m}-seed{s}"
            for m in methods for s in (0, 1)}
    for (method, _), run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["epochs"] == 2 and "ema_natural_acc" not in summary
        assert summary["loss"] == ("trades" if "trades" in method else "ce")
    for method in methods:
        res = json.loads((runs[method, 0] / "eval.json").read_text())
        assert res["complete"] and res["surrogate"] == str(runs[method, 1])
        assert set(res["autoattack_stages"]) == {"APGD-CE", "APGD-T", "FAB-T", "Square"}
        assert res["autoattack"] <= res["whitebox"]["PGD-2x1"] <= res["natural"]
    table = (tmp_path / "runs" / "table-cifar10-smallcnn.md").read_text()
    assert table in "\n".join(lines)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(ours)" in line]
    assert [r.split(" |")[0] for r in rows] == ["| Clean (ours)", "| PGD-AT (ours)",
                                                "| TRADES (ours)", "| IAAT (ours)",
                                                "| IAAT, TRADES loss (ours)"]
    assert "PGD-2x1" in table and "AutoAttack" in table
    exports = {m: tmp_path / "runs" / f"export-cifar10-smallcnn-{m}-seed0" for m in methods[1:]}
    for method, export in exports.items():  # in RobustBench's formats, with the run's numbers
        res = json.loads((runs[method, 0] / "eval.json").read_text())
        assert json.loads((export / "export.json").read_text())["evaluation"] == res
        info = json.loads((export / "model_info.json").read_text())
        assert info["autoattack_acc"] == str(round(100 * res["autoattack"], 2))
        assert {"model.pt", "model.py"} <= set(os.listdir(export))
    assert not (tmp_path / "runs" / "export-cifar10-smallcnn-clean-seed0").exists()

    # a second call does nothing again; a missing evaluation is redone, and its export
    checkpoint = runs["iaat", 1] / "checkpoint.pt"
    mtime = checkpoint.stat().st_mtime_ns
    (runs["at", 0] / "eval.json").unlink()
    lines.clear()
    assert reproduce.main(argv, log=lines.append) == 0
    running = [line for line in lines if line.startswith("running")]
    assert sum(line.startswith("done already") for line in lines) == 10 + 4 + 3
    assert len(running) == 2 and f"eval {runs['at', 0]} " in running[0]
    assert f"export {runs['at', 0]} {exports['at']}" in running[1]
    assert checkpoint.stat().st_mtime_ns == mtime
    assert (tmp_path / "runs" / "table-cifar10-smallcnn.md").read_text() == table
    # other evaluation flags: the five evaluations are redone, the runs are not
    lines.clear()
    assert reproduce.main(argv[:-1] + [TINY_EVAL.replace("2x1", "3x1")], log=lines.append) == 0
    running = [line for line in lines if line.startswith("running")]
    assert len(running) == 9 and all(" eval " in line for line in running[:5])
    assert all(" export " in line for line in running[5:])
    assert "PGD-3x1" in (tmp_path / "runs" / "table-cifar10-smallcnn.md").read_text()
    assert checkpoint.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("flags", [["--eval-flags", "--name mine"],
                                   ["--train-flags", "--out elsewhere"],
                                   ["--eval-flags=--checkpoint=best"]])
def test_flags_the_script_sets_itself_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["cifar10", "resnet18", *flags], log=lambda line: None)
    assert stop.value.code == 2 and "is set by this script" in capsys.readouterr().err


def test_the_table_sits_beside_the_papers_numbers():
    res = {"natural": 0.87, "whitebox": {"PGD-10x5": 0.43, "PGD-100x5": 0.42, "PGD-1000x2": 0.41},
           "transfer": 0.6, "autoattack": 0.39, "worst_case": 0.385}
    table = reproduce.table("cifar10", "resnet18", {"iaat": res})
    assert "| IAAT (ours) | 87.00 | 43.00 | 42.00 | 41.00 | 60.00 | - | 39.00 | 38.50 |" in table
    assert "| IAAT (paper) | 87.26 | 43.08 | 41.16 | 41.16 | 59.87 | 78.82 | - | - |" in table
    assert "| PGD-AT (paper) | 83.20 | 43.79 | 42.30 | 42.36 | 59.80 | 73.73 | - | - |" in table
    # CIFAR-100 (the paper's Table 2) has no corruption column
    assert "| IAAT (paper) | 63.90 | 18.50 | 17.10 | 17.11 | 35.74 | - | - | - |" in \
        reproduce.table("cifar100", "resnet18", {})


def test_the_estimate_says_it_is_one_and_scales_with_the_work(monkeypatch):
    import iaat
    monkeypatch.setattr(reproduce, "measured_images_per_second", lambda model: ({}, ""))
    cfg = iaat.make_config("cifar10", "resnet18")
    hours, text = reproduce.time_estimate("cifar10", "resnet18", cfg)
    assert "ESTIMATE, not a measurement" in text
    assert reproduce.forward_flops("resnet18", "cifar10") == pytest.approx(1.11e9, rel=0.02)
    longer, _ = reproduce.time_estimate("cifar10", "wrn32-10", iaat.make_config("cifar10", "wrn32-10"))
    assert 5 < hours < 60 and longer > 5 * hours  # 12x the FLOPs per image, 110 epochs not 200
    with_average, text = reproduce.time_estimate("cifar10", "resnet18", cfg, weights=2)
    assert with_average > hours and "10 evaluations" in text and "10 runs" in text


@pytest.mark.slow
def test_the_shell_command_prints_the_estimate():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    script = str(ROOT / "scripts" / "reproduce_table1.sh")
    r = subprocess.run(["bash", script, "cifar100", "resnet18", "--estimate"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "Expected time on one H100" in r.stdout, r.stderr
    r = subprocess.run(["bash", script, "cifar10", "vgg"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_the_estimate_uses_measured_throughput_where_there_is_one(tmp_path, monkeypatch):
    """With benchmarks/results/gpu_check-cuda.json, the IAAT and PGD-AT training hours are
    images / measured images per second; the rest stays an estimate, and only it scales with
    the assumed utilisation."""
    import iaat
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "gpu_check-cuda.json").write_text(json.dumps({"parts": {
        "environment": {"gpu": "NVIDIA H200"},
        "bench": {"none": {"images_per_second": {"iaat": 1000.0, "pgd_at": 2000.0}}}}}))
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    cfg = iaat.make_config("cifar10", "resnet18")
    hours, text = reproduce.time_estimate("cifar10", "resnet18", cfg)
    assert "measured 1000 images/s on NVIDIA H200" in text and "The rest is an ESTIMATE" in text
    images = 50_000 * 200 * 2
    measured_h = (images / 1000 + images / 2000) / 3600
    flops = reproduce.forward_flops("resnet18", "cifar10")
    rest = images * (3 + 28 + 28 + 23 * 0.7) * flops + 5 * 10_000 * reproduce.EVAL_PASSES * flops
    assert hours == pytest.approx(measured_h + rest / (0.10 * reproduce.H100_TF32) / 3600)
    low = float(text.split(" h at ")[0].split(", ")[-1].split("-")[0])
    assert low == pytest.approx(measured_h + rest / (0.20 * reproduce.H100_TF32) / 3600, abs=0.5)


def test_ema_runs_go_to_their_own_folders_and_both_weights_are_evaluated(tmp_path):
    args = reproduce.parse(["cifar10", "resnet18", "--out", str(tmp_path), "--ema", "0.999"])
    argv = reproduce.train_argv(args, "iaat-trades", 1)
    assert argv[argv.index("--ema") + 1] == "0.999"
    assert argv[argv.index("--out") + 1] == str(tmp_path / "cifar10-resnet18-iaat-trades-seed1-ema0.999")
    assert ["--method", "iaat", "--loss", "trades"] == argv[4:8]
    assert reproduce.weights(args) == (("raw", "eval"), ("ema", "eval_ema"))
    ema = reproduce.eval_argv(args, "at", "ema", "eval_ema")
    assert ema[ema.index("--weights") + 1] == "ema" and ema[ema.index("--name") + 1] == "eval_ema"
    plain = reproduce.parse(["cifar10", "resnet18", "--out", str(tmp_path)])
    assert "--ema" not in reproduce.train_argv(plain, "at", 0) and len(reproduce.weights(plain)) == 1
    res = {"natural": 0.9, "whitebox": {"PGD-10x5": 0.5}}
    table = reproduce.table("cifar10", "resnet18", {"at": res, ("at", "ema"): res})
    assert "| PGD-AT (weight average, ours) | 90.00 | 50.00 |" in table
