"""--val-size: a held-out split of the training set, never trained on, that picks best.pt."""
import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import iaat
import iaat_eval
from conftest import ROOT, run_cli

SHORT = dict(epochs=4, warmup=1, n_train=300, val_size=60, eval_subset=0, lr_milestones=(3,))
# the same run on the command line, checkpointing every 2 steps as well
CLI = ["--epochs", "4", "--warmup", "1", "--n-train", "300", "--val-size", "60", "--eval-subset",
       "0", "--lr-milestones", "3", "--save-every", "2"]


def _config(out, **overrides):
    return iaat.make_config("digits", **{**SHORT, "out": str(out), **overrides})


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _ids(x_u8):
    """The image numbers that _numbered_digits wrote into the first two pixels."""
    return (x_u8[:, 0, 0, 0].long() + 256 * x_u8[:, 0, 0, 1].long()).tolist()


@pytest.fixture
def numbered_digits(monkeypatch):
    """The real digits labels and split, each training image replaced by its own number."""
    real = iaat.load_digits

    def numbered(split_seed=0, n_test=497):
        data = real(split_seed, n_test)
        x = torch.zeros_like(data.train_x)
        ids = torch.arange(len(x))
        x[:, 0, 0, 0], x[:, 0, 0, 1] = (ids % 256).to(torch.uint8), (ids // 256).to(torch.uint8)
        return dataclasses.replace(data, train_x=x)
    monkeypatch.setattr(iaat, "load_digits", numbered)


def test_held_out_images_never_reach_a_training_batch(tmp_path, monkeypatch, numbered_digits):
    cfg = _config(tmp_path / "run", epochs=2)
    data = iaat.load_data(cfg, "cpu")
    held_out, kept = set(_ids(data.val_x)), set(_ids(data.train_x))
    assert len(held_out) == 60 and len(kept) == 240 and not held_out & kept
    assert held_out | kept == set(range(300))  # taken from the first --n-train images
    labels = iaat.load_digits().train_y[:300]
    per_class = np.bincount(labels[sorted(held_out)].numpy(), minlength=10)
    expected = np.bincount(labels.numpy(), minlength=10) * 60 / 300
    assert np.abs(per_class - expected).max() <= 1  # stratified
    # the split is fixed by --split-seed, not by --seed
    assert _ids(iaat.load_data(dataclasses.replace(cfg, seed=5), "cpu").val_x) == _ids(data.val_x)
    assert _ids(iaat.load_data(dataclasses.replace(cfg, split_seed=1), "cpu").val_x) \
        != _ids(data.val_x)

    trained_on, evaluated = [], []
    augment, evaluate = iaat.augment, iaat.evaluate
    monkeypatch.setattr(iaat, "augment", lambda x, *a: trained_on.append(_ids(x)) or augment(x, *a))
    monkeypatch.setattr(iaat, "evaluate", lambda m, x, *a, **k: evaluated.append(_ids(x))
                        or evaluate(m, x, *a, **k))
    iaat.train(cfg, log=lambda msg: None)
    seen = [i for batch in trained_on for i in batch]
    assert len(seen) == 2 * 240 and set(seen) == kept  # every kept image, once per epoch
    assert not set(seen) & held_out
    assert evaluated[:2] == [sorted(held_out)] * 2  # each epoch's check is on the held-out images


def _scripted_val_pgd(monkeypatch, values):
    """iaat.evaluate as it is, except that the held-out PGD accuracy of epoch k is values[k]."""
    evaluate, calls = iaat.evaluate, []

    def scripted(model, x, y, **kw):
        acc = evaluate(model, x, y, **kw)
        if len(y) == SHORT["val_size"] and len(calls) < len(values):
            acc = dict(acc, robust=values[len(calls)])
            calls.append(acc)
        return acc
    monkeypatch.setattr(iaat, "evaluate", scripted)


def test_best_is_the_first_epoch_with_the_highest_held_out_pgd(tmp_path, monkeypatch):
    _scripted_val_pgd(monkeypatch, [0.2, 0.5, 0.5, 0.3])  # epoch 2 ties epoch 3: the first wins
    summary = iaat.train(_config(tmp_path / "run"), log=lambda msg: None)
    rows = _rows(tmp_path / "run")
    assert [r["val_pgd"] for r in rows] == [0.2, 0.5, 0.5, 0.3]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] == 2 and summary["best_val_pgd"] == 0.5
    monkeypatch.undo()
    # best.pt holds the model of epoch 2: the same run stopped after 2 epochs (the schedule
    # does not depend on --epochs) ends with the same weights
    iaat.train(_config(tmp_path / "two", epochs=2), log=lambda msg: None)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(best["model"][k], two["model"][k]) for k in two["model"])
    last = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "run"
    r = run_cli(*CLI, "--out", out)
    assert r.returncode == 0, r.stderr
    assert " | val clean " in r.stdout
    return out


@pytest.mark.slow
def test_best_pt_matches_metrics_of_a_real_run(val_run):
    rows = _rows(val_run)
    scores = [r["val_pgd"] for r in rows]
    best = torch.load(val_run / "best.pt", weights_only=True)
    assert best["epoch"] == rows[int(np.argmax(scores))]["epoch"]
    # its weights are that epoch's: they give the held-out clean accuracy logged for it
    model, cfg, data, epoch = iaat_eval.load_run(val_run, checkpoint="best")
    with torch.no_grad():
        clean = (model(iaat.to_float(data.val_x)).argmax(1) == data.val_y).float().mean().item()
    assert epoch == best["epoch"] and clean == pytest.approx(rows[epoch - 1]["val_clean"])


def _same_checkpoint(a, b):
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _both(out):
    return [torch.load(out / name, weights_only=True) for name in ("best.pt", "checkpoint.pt")]


def _whole_run(tmp_path, monkeypatch, cfg, scores):
    """The run of `cfg` without a kill, with these held-out scores; its two checkpoints."""
    _scripted_val_pgd(monkeypatch, scores)
    iaat.train(dataclasses.replace(cfg, out=str(tmp_path / "whole")), log=lambda msg: None)
    monkeypatch.undo()
    return _both(tmp_path / "whole")


@pytest.mark.slow
def test_a_kill_between_last_and_best_checkpoint_is_repaired_on_resume(tmp_path, monkeypatch):
    """checkpoint.pt of epoch 2 (a new best) written, the kill before best.pt: the resumed run
    starts at the end of epoch 2 and writes best.pt from it first."""
    scores, cfg = [0.1, 0.2, 0.15, 0.1], _config(tmp_path / "run", save_every=2)
    whole = _whole_run(tmp_path, monkeypatch, cfg, scores)
    keep_best = iaat.keep_best

    def killed_at_epoch_2(out, rows):
        if rows and rows[-1]["epoch"] == 2:
            raise RuntimeError("killed")
        keep_best(out, rows)
    monkeypatch.setattr(iaat, "keep_best", killed_at_epoch_2)
    _scripted_val_pgd(monkeypatch, scores)
    with pytest.raises(RuntimeError, match="killed"):
        iaat.train(cfg, log=lambda msg: None)
    best, last = _both(tmp_path / "run")
    assert (best["epoch"], last["epoch"], last["step"]) == (1, 2, 0)
    monkeypatch.undo()
    _scripted_val_pgd(monkeypatch, scores[2:])
    iaat.train(cfg, log=lambda msg: None)
    for a, b in zip(_both(tmp_path / "run"), whole):
        _same_checkpoint(a, b)
    assert [r["val_pgd"] for r in _rows(tmp_path / "run")] == scores


@pytest.mark.slow
def test_a_redone_epoch_that_scores_otherwise_keeps_best_consistent(tmp_path, monkeypatch):
    """On a GPU a redone epoch need not repeat itself. Kill epoch 2, a new best, just before
    its checkpoint.pt; the redo scores lower: best.pt, metrics and summary all stay at 1."""
    cfg = _config(tmp_path / "run", save_every=2)
    save = iaat.save_checkpoint

    def killed_at_end_of_epoch_2(path, cfg_, s, *a, **k):
        if path.name == "checkpoint.pt" and (s.epoch, s.step) == (2, 0):
            raise RuntimeError("killed")
        save(path, cfg_, s, *a, **k)
    monkeypatch.setattr(iaat, "save_checkpoint", killed_at_end_of_epoch_2)
    _scripted_val_pgd(monkeypatch, [0.1, 0.2])
    with pytest.raises(RuntimeError, match="killed"):
        iaat.train(cfg, log=lambda msg: None)
    assert [r["val_pgd"] for r in _rows(tmp_path / "run")] == [0.1, 0.2]  # logged, not saved
    monkeypatch.undo()
    _scripted_val_pgd(monkeypatch, [0.05, 0.07, 0.09])  # the redone epoch 2, then 3 and 4
    summary = iaat.train(cfg, log=lambda msg: None)
    assert [r["val_pgd"] for r in _rows(tmp_path / "run")] == [0.1, 0.05, 0.07, 0.09]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] == 1 and summary["best_val_pgd"] == 0.1


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_best(tmp_path, val_run):
    """A SIGKILL from outside, as soon as best.pt first appears (during epoch 2)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "iaat.py"), *CLI, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "best.pt").exists():  # epoch 1 just ended
        assert proc.poll() is None and time.time() < deadline, "run ended before best.pt"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] < 4
    r = run_cli(*CLI, "--out", out)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    for a, b in zip(_both(out), _both(val_run)):
        _same_checkpoint(a, b)


@pytest.mark.slow
def test_eval_picks_the_checkpoint_and_says_which(val_run, tmp_path):
    best_epoch = torch.load(val_run / "best.pt", weights_only=True)["epoch"]
    quick = ("--parts", "whitebox", "--whitebox", "5x1", "--n-examples", "40")
    r = subprocess.run([sys.executable, str(ROOT / "iaat.py"), "eval", str(val_run),
                        "--checkpoint", "best", *quick], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((val_run / "eval_best.json").read_text())
    assert (res["checkpoint"], res["checkpoint_epoch"]) == ("best", best_epoch)
    assert f"(best checkpoint, epoch {best_epoch} of 4)" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "iaat.py"), "eval", str(val_run), *quick],
                       capture_output=True, text=True)
    res = json.loads((val_run / "eval.json").read_text())
    assert r.returncode == 0 and (res["checkpoint"], res["checkpoint_epoch"]) == ("last", 4)

    no_best = tmp_path / "plain"
    assert run_cli("--epochs", 1, "--n-train", 64, "--eval-subset", 0, "--out", no_best).returncode == 0
    r = subprocess.run([sys.executable, str(ROOT / "iaat.py"), "eval", str(no_best),
                        "--checkpoint", "best"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--val-size" in r.stderr


@pytest.mark.parametrize("n", [5, 300, -1])
def test_a_val_size_that_cannot_be_held_out_is_a_one_line_error(tmp_path, n):
    r = run_cli("--epochs", 1, "--n-train", 300, "--val-size", n, "--out", tmp_path / "run")
    assert r.returncode == 1 and r.stderr.startswith("iaat: error: --val-size")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_normalisation_comes_from_the_images_trained_on_only():
    """The model's Normalize statistics: every training image by default (unchanged), and
    only those trained on with --n-train or --val-size, never the held-out ones."""
    full = iaat.load_digits()
    default = iaat.load_data(iaat.make_config("digits"), "cpu")
    assert (default.mean, default.std) == (full.mean, full.std)
    for overrides in (dict(val_size=200), dict(n_train=300), dict(n_train=300, val_size=60)):
        data = iaat.load_data(iaat.make_config("digits", **overrides), "cpu")
        pixels = data.train_x.double() / 255
        assert data.mean == pytest.approx((pixels.mean().item(),), abs=1e-6)
        assert data.std == pytest.approx((pixels.std().item(),), abs=1e-6)
        assert abs(data.mean[0] - full.mean[0]) > 1e-5, overrides  # another set of images
