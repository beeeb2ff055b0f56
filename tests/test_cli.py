"""Bad input gets a one-line error and a non-zero exit, and nothing already written is lost
(docs/design.md, Reliability). Everything runs the real CLI in a subprocess."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli
import iaat_notebook
import iaat_run

QUICK = ["--epochs", "1", "--n-train", "64", "--eval-subset", "20", "--eval-steps", "2"]


def _one_line_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("iaat: error:")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["--dataset", "mnist"], ["invalid choice: 'mnist'"]),
    (["--model", "vgg16"], ["invalid choice: 'vgg16'"]),
    (["--method", "madry"], ["invalid choice: 'madry'"]),
    (["--eps-w", "-8"], ["--eps-w must be a finite number >= 0", "-8/255"]),
    (["--eps", "nan"], ["--eps-w must be a finite number >= 0"]),
    (["--gamma", "-1.9"], ["--gamma must be a finite number >= 0"]),
    (["--beta", "0"], ["--beta must be in (0, 1]"]),
    (["--epochs", "ten"], ["invalid int value: 'ten'"]),
])
def test_bad_arguments(tmp_path, args, fragments):
    r = run_cli(*args, "--out", tmp_path / "run")
    _one_line_error(r, *fragments)
    assert not (tmp_path / "run").exists()


def test_missing_dataset_with_download_off(tmp_path):
    r = run_cli("--dataset", "cifar10", "--data-root", tmp_path / "nothing", "--no-download",
                "--out", tmp_path / "run")
    _one_line_error(r, "cifar10 not found", "--no-download")


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    r = run_cli(*QUICK, "--out", out)
    _one_line_error(r, "checkpoint", "unreadable")
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint at all"


def test_checkpoint_holding_arbitrary_objects_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"format": 1, "config": {}, "payload": object()}, out / "checkpoint.pt")
    _one_line_error(run_cli(*QUICK, "--out", out), "unreadable")


@pytest.mark.slow
def test_mismatched_checkpoint_is_reported_and_kept(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*QUICK, "--out", out).returncode == 0
    before = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    r = run_cli(*QUICK, "--gamma", "5", "--out", out)
    _one_line_error(r, "was written with gamma=", "another --out")
    assert before == ((out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text())


@pytest.mark.slow
def test_checkpoint_of_another_model_is_reported(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*QUICK, "--out", out).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {k + ".x": v for k, v in ckpt["model"].items()}
    torch.save(ckpt, out / "checkpoint.pt")
    _one_line_error(run_cli(*QUICK, "--out", out), "does not match this run")


@pytest.mark.slow
def test_exploding_training_stops_with_one_line(tmp_path):
    r = run_cli(*QUICK, "--lr", "1e38", "--weight-decay", "1", "--batch-size", "16", "--out", tmp_path / "run")
    _one_line_error(r, "non-finite", "--lr")


def test_nan_loss_leaves_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import iaat
    cfg = iaat.make_config("digits", epochs=1, n_train=64, eval_subset=20, eval_steps=2,
                           out=str(tmp_path / "run"))
    iaat.train(cfg, log=lambda s: None)
    out = tmp_path / "run"
    before = [(out / f).read_bytes() for f in ("checkpoint.pt", "metrics.jsonl", "eps_history.npy")]
    real = iaat.train_step

    def nan_step(*args, **kwargs):  # the second epoch's loss turns NaN
        stats = real(*args, **kwargs)
        stats["loss"] = stats["loss"] * float("nan")
        return stats
    monkeypatch.setattr(iaat, "train_step", nan_step)
    monkeypatch.setattr(sys, "argv", ["iaat.py"])
    assert iaat.main(["--epochs", "2", "--n-train", "64", "--eval-subset", "20", "--eval-steps",
                      "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "is kept" in err[0]
    assert before == [(out / f).read_bytes() for f in ("checkpoint.pt", "metrics.jsonl",
                                                        "eps_history.npy")]


@pytest.mark.slow
def test_incomplete_checkpoint_is_reported(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*QUICK, "--out", out).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["rng"]
    torch.save(ckpt, out / "checkpoint.pt")
    _one_line_error(run_cli(*QUICK, "--out", out), "not a complete iaat checkpoint", "rng")


@pytest.mark.slow
def test_checkpoint_from_another_device_type_is_reported(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*QUICK, "--out", out).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["device"] = "cuda"
    torch.save(ckpt, out / "checkpoint.pt")
    _one_line_error(run_cli(*QUICK, "--out", out), "written on cuda, this run is on cpu")


@pytest.mark.slow
def test_fresh_run_never_overwrites_another_runs_outputs(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*QUICK, "--out", out).returncode == 0
    (out / "checkpoint.pt").rename(tmp_path / "moved.pt")  # only the checkpoint moved away
    before = (out / "metrics.jsonl").read_text()
    _one_line_error(run_cli(*QUICK, "--out", out), "but no checkpoint", "move the whole folder")
    assert (out / "metrics.jsonl").read_text() == before


def test_out_naming_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("keep me")
    _one_line_error(run_cli(*QUICK, "--out", tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_run_folder_is_locked_and_stale_temporary_files_go(tmp_path):
    (tmp_path / ".checkpoint.pt.tmp999").write_bytes(b"left by a killed writer")
    lock = iaat_run.claim_run_dir(tmp_path, "cpu")
    assert not (tmp_path / ".checkpoint.pt.tmp999").exists()
    with pytest.raises(BlockingIOError, match="another process is training"):
        iaat_run.claim_run_dir(tmp_path, "cpu")
    lock.close()
    iaat_run.claim_run_dir(tmp_path, "cpu").close()


def test_help_explains_units_and_sources():
    r = run_cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "gamma of Alg 2 (Table 10: 1.9) [x/255" in text
    assert "presets (override any with its flag)" in text


@pytest.mark.parametrize("dataset,model,overrides", [
    ("digits", None, dict()),
    ("digits", None, dict(method="at", eps_w=12.75 / 255, epochs=20, lr_milestones=(13, 17),
                          out="runs/x")),
    ("digits", None, dict(warmup=0, line_search=True, download=False, eps_max=16 / 255, seed=3)),
    ("cifar10", "wrn32-10", dict(epochs=6)),  # not the dataset's default network: --model
    ("cifar100", "smallcnn", dict()),
])
def test_command_line_rebuilds_the_config(dataset, model, overrides):
    import iaat
    cfg = iaat.make_config(dataset, model, **overrides)
    cmd = iaat_notebook.command_line(cfg)
    assert cmd.startswith(f"python iaat.py --dataset {dataset} ")
    assert ("--model" in cmd) == (model is not None)
    assert iaat.config_from_args(cmd.split()[2:]) == cfg


@pytest.mark.parametrize("world,finalized", [("2", False), ("1", True)])
def test_a_torchrun_process_ends_without_finalization_and_loses_no_output(world, finalized):
    """exit_process: under torchrun with other processes (WORLD_SIZE > 1) the exit skips the
    interpreter's teardown, where gloo threads that DistributedDataParallel keeps alive could
    abort the process; what the process printed still arrives, and the code is kept."""
    code = ("import atexit, sys, iaat_run; atexit.register(lambda: print('finalized')); "
            "print('printed', end=''); print('to stderr', file=sys.stderr, end=''); "
            "iaat_run.exit_process(3)")
    env = dict(os.environ, WORLD_SIZE=world, PYTHONUNBUFFERED="0")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3
    assert r.stdout.startswith("printed") and r.stderr == "to stderr"
    assert ("finalized" in r.stdout) == finalized
