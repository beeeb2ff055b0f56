"""Algorithm 1 and the training run: warmup, the S+/S- split, outputs, resume after a kill."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import iaat
import iaat_notebook
import iaat_run
from conftest import ROOT, run_cli, tiny_cnn

QUICK = ["--epochs", "3", "--warmup", "1", "--n-train", "192", "--eval-subset", "100",
         "--eval-steps", "5", "--batch-size", "32"]


def test_warmup_uses_eps_w_and_leaves_memory_alone():
    cfg = iaat.make_config("digits", warmup=2, eps_w=0.3, gamma=0.05, attack_steps=3)
    model, x, y = tiny_cnn(), torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    mem = torch.full((100,), 0.3)
    idx = torch.arange(10, 26)
    eps = iaat.choose_epsilon(model, x, y, idx, mem, epoch=1, cfg=cfg)
    assert torch.all(eps == 0.3) and torch.all(mem == 0.3)
    eps = iaat.choose_epsilon(model, x, y, idx, mem, epoch=2, cfg=cfg)  # Alg 2 from here on
    assert torch.equal(mem[idx], eps) and torch.all(mem[:10] == 0.3) and torch.all(mem[26:] == 0.3)
    assert not torch.all(eps == 0.3)  # moved by beta * gamma up or down
    assert torch.allclose((eps - 0.3).abs(), torch.tensor(0.1 * 0.05))


def test_no_warmup_selects_from_the_first_epoch():
    cfg = iaat.make_config("digits", warmup=0, attack_steps=3)
    model, x, y = tiny_cnn(), torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    mem = torch.full((16,), cfg.eps_w)
    iaat.choose_epsilon(model, x, y, torch.arange(16), mem, epoch=0, cfg=cfg)
    assert not torch.all(mem == cfg.eps_w)


def test_loss_split_misclassified_samples_train_on_clean_input():
    cfg = iaat.make_config("digits", attack_steps=3)
    model = tiny_cnn()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[:20] = (y[:20] + 1) % 10  # S-: misclassified on the clean input
    correct = iaat.clean_correct(model.train(), x, y)
    assert correct[20:].all() and not correct[:20].any() and model.training
    x_in = iaat.training_inputs(model, x, y, torch.full((64,), 0.2), correct, cfg)
    assert torch.equal(x_in[:20], x[:20])  # S-: clean x_i, Alg 1 l.11 second sum
    assert ((x_in[20:] - x[20:]).abs().flatten(1).amax(1) > 0.1).all()  # S+: x_i^adv


def test_train_step_minimises_the_alg1_loss():
    """The step's loss is the mean cross-entropy of x_adv over S+ and of the clean x over S-."""
    import copy
    import torch.nn.functional as F
    cfg = iaat.make_config("digits", warmup=5, attack_steps=3)
    model = tiny_cnn()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[:20] = (y[:20] + 1) % 10  # S-
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    correct = iaat.clean_correct(ref, x, y)
    x_in = iaat.training_inputs(ref, x, y, torch.full((64,), cfg.eps_w), correct, cfg)
    want = F.cross_entropy(ref.train()(x_in), y)
    assert not torch.isclose(want, F.cross_entropy(ref(x), y))  # the attack matters
    s = iaat.make_state(model, cfg, 64)  # epoch 0: warmup, eps_w for everyone in S+
    torch.manual_seed(5)
    stats = iaat.train_step(s, x, y, torch.arange(64), cfg)
    torch.testing.assert_close(stats["loss"] / 64, want.detach())
    assert stats["clean_acc"] == 44 and any(p.grad is not None for p in model.parameters())


def test_run_folder_names_each_setting_that_differs_from_the_preset():
    assert str(iaat.run_dir(iaat.make_config("digits"))) == "runs/digits-smallcnn-iaat-seed0"
    cfg = iaat.make_config("cifar10", warmup=0, eps_w=4 / 255, line_search=True, seed=2,
                           device="cpu", epochs=3)  # device and epochs never name a run
    assert str(iaat.run_dir(cfg)) == "runs/cifar10-resnet18-iaat-seed2-eps_w4-warmup0-line_search"
    assert str(iaat.run_dir(iaat.make_config("digits", out="x/y"))) == "x/y"


def test_bn_mode_of_training_attack_follows_flag():
    model = tiny_cnn().train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for mode, changes in (("train", True), ("eval", False)):
        cfg = iaat.make_config("digits", attack_steps=2, attack_bn=mode)
        before = model[1].running_mean.clone()
        iaat.training_inputs(model, x, y, torch.full((32,), 0.1), torch.ones(32, dtype=torch.bool), cfg)
        assert (not torch.equal(before, model[1].running_mean)) is changes
        assert model.training


def test_short_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    for name in ("checkpoint.pt", "metrics.jsonl", "eps_history.npy", "summary.json",
                 "config.json", "curves.png", "eps_hist.png", "eps_mean.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["test_clean"] <= 1 and 0 <= r["test_pgd"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert r.stdout.strip().splitlines()[-1].startswith("final digits smallcnn iaat seed 0: natural")
    assert f"{summary['natural_acc']:.4f}" in r.stdout
    hist = np.load(out / "eps_history.npy")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert hist.shape == (3, 192) and ckpt["epoch"] == 3
    assert np.allclose(hist[0], 0.2)  # warmup epoch: memory untouched at eps_init = eps_w
    assert hist[2].std() > 0  # Alg 2 gives samples different radii
    assert np.array_equal(hist[-1], ckpt["eps_memory"].numpy())
    assert set(ckpt["rng"]) >= {"torch"} and ckpt["config"]["gamma"] == pytest.approx(0.05)
    # rerunning a finished command resumes at the end and reports the same result
    again = run_cli(*QUICK, "--out", out)
    assert again.returncode == 0 and json.loads((out / "summary.json").read_text()) == summary


def _final_state(out):
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # the timings
        row.pop("seconds"), row.pop("images_per_second")
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("train_seconds"), summary.pop("run")
    return ckpt, rows, summary, np.load(out / "eps_history.npy")


def _assert_same_final_state(a, b):
    (ca, ra, sa, ha), (cb, rb, sb, hb) = _final_state(a), _final_state(b)
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert torch.equal(ca["eps_memory"], cb["eps_memory"])
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    assert ra == rb and sa == sb and np.array_equal(ha, hb)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    r = run_cli(*QUICK, "--save-every", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def _start_and_wait_for(out, name):
    """Start the quick run and return once `name` exists in its run folder."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "iaat.py"), *QUICK, "--save-every", "2",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (out / name).exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended before {name}"
        time.sleep(0.01)
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_state(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _start_and_wait_for(out, "metrics.jsonl")  # epoch 1 just ended: kill mid-write
    proc.kill()
    proc.wait()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) < (3, 0), "the kill came too late to test anything"
    r = run_cli(*QUICK, "--save-every", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    _assert_same_final_state(uninterrupted, out)


def test_sigterm_saves_mid_epoch_and_resumes(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _start_and_wait_for(out, "checkpoint.pt")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "checkpoint saved" in stdout and "Traceback" not in stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] > 0  # saved inside an epoch: the mid-epoch resume path is exercised
    r = run_cli(*QUICK, "--save-every", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    _assert_same_final_state(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.parametrize("method,eps", [("at", 0.2), ("clean", 0.0)])
def test_baselines_train(tmp_path, method, eps):
    out = tmp_path / method
    r = run_cli(*QUICK, "--epochs", "1", "--method", method, "--out", out)
    assert r.returncode == 0, r.stderr
    assert np.allclose(np.load(out / "eps_history.npy"), eps)
    assert f"final digits smallcnn {method}" in r.stdout


@pytest.mark.slow
def test_line_search_variant_trains(tmp_path):
    out = tmp_path / "ls"
    r = run_cli(*QUICK, "--epochs", "1", "--warmup", "0", "--line-search", "--out", out)
    assert r.returncode == 0, r.stderr
    hist = np.load(out / "eps_history.npy")
    grid = np.round(hist * 255 / 12.75, 4)  # line-eta 0.05 = 12.75/255: values on the grid
    assert np.allclose(grid, np.round(grid)) and hist.std() > 0


def test_train_or_load_reads_a_finished_run_and_trains_an_unfinished_one(tmp_path):
    cfg = iaat.make_config("digits", epochs=1, n_train=64, eval_subset=20, eval_steps=2,
                           out=str(tmp_path / "run"))
    first = iaat_notebook.train_or_load(cfg)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    assert iaat_notebook.train_or_load(cfg) == first and ckpt.stat().st_mtime_ns == stamp  # read, not rerun
    longer = iaat_notebook.train_or_load(iaat.make_config(
        "digits", epochs=2, n_train=64, eval_subset=20, eval_steps=2, out=str(tmp_path / "run")))
    assert longer["epochs"] == 2 and ckpt.stat().st_mtime_ns != stamp  # resumed to epoch 2



def test_loss_history_is_the_run_trained_in_one_go_with_a_loss_per_epoch(tmp_path):
    """iaat_notebook.loss_history trains epoch by epoch; the run ends bit for bit where one
    uninterrupted run does (weights, BN statistics, eps memory and history), its record has the
    final model's clean losses as its last row, and it is read back, not retrained."""
    import numpy as np
    import torch.nn.functional as F

    import iaat_eval
    settings = dict(epochs=3, warmup=1, n_train=96, batch_size=32, eval_subset=10, eval_steps=2,
                    label_noise=0.1)
    by_epoch = iaat.make_config("digits", out=str(tmp_path / "by-epoch"), **settings)
    history = iaat_notebook.loss_history(by_epoch)
    in_one_go = iaat.make_config("digits", out=str(tmp_path / "in-one-go"), **settings)
    iaat.train(in_one_go, log=lambda msg: None)
    a, b = (iaat_run.read_checkpoint(tmp_path / name / "checkpoint.pt")
            for name in ("by-epoch", "in-one-go"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert torch.equal(a["eps_memory"], b["eps_memory"])
    assert np.array_equal(np.load(tmp_path / "by-epoch" / "eps_history.npy"),
                          np.load(tmp_path / "in-one-go" / "eps_history.npy"))
    assert history.shape == (3, 96) and not np.allclose(history[0], history[-1])
    model, _, data, _ = iaat_eval.load_run(tmp_path / "by-epoch")
    with torch.no_grad():  # against the labels trained on: 10% of them flipped
        last = F.cross_entropy(model(iaat.to_float(data.train_x)), data.train_y, reduction="none")
    np.testing.assert_allclose(history[-1], last.numpy(), rtol=1e-5)
    stamp = (tmp_path / "by-epoch" / "checkpoint.pt").stat().st_mtime_ns
    assert np.array_equal(iaat_notebook.loss_history(by_epoch), history)  # read back
    assert (tmp_path / "by-epoch" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert iaat_notebook.loss_history(in_one_go) is None  # trained without the record
