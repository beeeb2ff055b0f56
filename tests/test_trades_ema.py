"""TRADES (its loss, its inner maximisation, IAAT with it) and the weight average (--ema):
against the formulas by hand, per-image radii, the copyable block, resume, and the defaults."""
import copy
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import iaat
import iaat_export
from conftest import ROOT, run_cli, tiny_cnn

QUICK = ["--epochs", "3", "--warmup", "1", "--n-train", "192", "--eval-subset", "50",
         "--eval-steps", "3", "--batch-size", "32", "--attack-steps", "3"]


def _kl_by_hand(logits_adv, logits_clean):
    """sum_i sum_c p_c(x_i) (log p_c(x_i) - log p_c(x'_i)), written out."""
    p, q = logits_clean.softmax(1), logits_adv.softmax(1)
    return (p * (p.log() - q.log())).sum()


def test_trades_loss_is_the_formula_by_hand():
    """CE on clean + beta * KL(p(x) || p(x')) / B, the gradient through both predictions."""
    model, x, y = tiny_cnn(), torch.rand(6, 1, 8, 8), torch.arange(6) % 10
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ref = copy.deepcopy(model)
    for beta in (0.0, 1.0, 6.0):
        loss, logits_adv = iaat.trades_loss(model.train(), x, x_adv, y, beta)
        logits, want_adv = ref.train()(x), ref(x_adv)
        want = F.cross_entropy(logits, y) + beta * _kl_by_hand(want_adv, logits) / len(x)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(logits_adv, want_adv)
    assert float(_kl_by_hand(want_adv, logits).detach()) > 1e-4  # the KL term is not zero here
    loss, _ = iaat.trades_loss(model, x, x_adv, y, 6.0)
    loss.backward()
    want.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # the clean prediction is part of the gradient (trades.py does not detach it)
    detached = F.cross_entropy(ref(x), y) + 6.0 * F.kl_div(
        ref(x_adv).log_softmax(1), ref(x).softmax(1).detach(), reduction="batchmean")
    grads = torch.autograd.grad(detached, list(ref.parameters()))
    assert any(not torch.allclose(g, p.grad) for g, p in zip(grads, model.parameters()))


def _trades_py(model, x_natural, y, step_size, epsilon, perturb_steps, beta):
    """trades.py's trades_loss (yaodongyu/TRADES, distance 'l_inf'), line for line, with the
    noise drawn on the CPU instead of .cuda() and the deprecated size_average spelt out.
    Returns (loss, x_adv)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                   F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    return loss_natural + beta * loss_robust, x_adv


@pytest.mark.parametrize("steps", [0, 1, 10])
def test_trades_matches_trades_py(steps):
    """The attack in eval mode, then the loss in train mode, as the training step calls them,
    against trades.py run from the same seed: the same adversarial images (its unprojected
    start included), loss, gradient and BatchNorm running statistics."""
    model, x, y = tiny_cnn(), torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    x[:4] = x[:4].round()  # pixels at 0 and 1, where the unprojected start leaves [0,1]
    ref, tracked = copy.deepcopy(model), int(model[1].num_batches_tracked)
    torch.manual_seed(7)
    want, want_adv = _trades_py(ref, x, y, step_size=0.007, epsilon=0.031, perturb_steps=steps,
                                beta=6.0)
    want.backward()
    torch.manual_seed(7)
    x_adv = iaat.trades_attack(model.eval(), x, 0.031, steps=steps, step_size=0.007)
    loss, _ = iaat.trades_loss(model.train(), x, x_adv, y, beta=6.0)
    loss.backward()
    torch.testing.assert_close(x_adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(loss, want)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    bn, bn_ref = model[1], ref[1]
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == tracked + 3  # x, x', x
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert float(loss.detach() - F.cross_entropy(model(x), y)) > 1e-6  # the KL term counts


def test_trades_attack_raises_the_kl_and_stays_in_each_ball():
    torch.manual_seed(1)
    model = tiny_cnn().eval()
    x = torch.rand(8, 1, 8, 8)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.02, 0.15])
    x_adv = iaat.trades_attack(model, x, eps, steps=10, step_size=0.02)
    dist = (x_adv - x).abs().flatten(1).amax(1)
    assert bool((dist <= eps + 1e-6).all()) and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv[0], x[0])  # eps 0: the clean image
    with torch.no_grad():
        clean = model(x)
        per_image = lambda xa: F.kl_div(model(xa).log_softmax(1), clean.softmax(1),  # noqa
                                        reduction="none").sum(1)
        start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        after, before = per_image(x_adv), per_image(start)
    assert bool((after[1:] > before[1:]).all())  # every image with a ball: KL went up
    assert float(after[5]) > float(after[1])     # and more in a larger ball


def test_iaat_with_the_trades_loss_attacks_each_image_at_its_own_radius(monkeypatch):
    """Radii 0.01 and 0.3 in the memory for two images of S+, and a third image misclassified
    (S-): the KL attack gets Alg 2's new radius of each image of S+ and 0 for S-, in eval
    mode; each x'_i stays in its own ball; the outer loss runs in train mode."""
    cfg = iaat.make_config("digits", loss="trades", warmup=0, attack_steps=3, beta=1.0)
    model = tiny_cnn()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[2] = (y[2] + 1) % 10  # S-
    s = iaat.make_state(model, cfg, 3)
    s.mem.copy_(torch.tensor([0.01, 0.3, 0.2]))
    seen = {}
    attack, loss = iaat.trades_attack, iaat.trades_loss

    def attack_spy(model, x, eps, **kw):
        seen["eps"], seen["attack_training"] = eps.clone(), model.training
        seen["x_adv"] = attack(model, x, eps, **kw)
        return seen["x_adv"]

    def loss_spy(model, *a):
        seen["loss_training"] = model.training
        return loss(model, *a)
    monkeypatch.setattr(iaat, "trades_attack", attack_spy)
    monkeypatch.setattr(iaat, "trades_loss", loss_spy)
    monkeypatch.setattr(iaat, "pgd_attack", lambda *a, **k: pytest.fail("the CE attack ran"))
    iaat.train_step(s, x, y, torch.arange(3), cfg)
    assert seen["eps"].tolist() == pytest.approx([*s.mem[:2].tolist(), 0.0])  # Alg 2's, per image
    assert 0.0 < float(s.mem[0]) < 0.05 < 0.2 < float(s.mem[1])
    assert (seen["attack_training"], seen["loss_training"]) == (False, True)
    dist = (seen["x_adv"] - x).abs().flatten(1).amax(1)
    assert bool((dist[:2] <= s.mem[:2] + 1e-6).all()) and float(dist[1]) > 0.05
    assert torch.equal(seen["x_adv"][2], x[2])  # S-: the clean image


def test_trades_block_runs_alone():
    """The block between its banner and 'end of the TRADES loss', pasted into a file that
    imports torch and F only, gives iaat's results."""
    lines = (ROOT / "iaat.py").read_text().splitlines()
    first = next(i for i, s in enumerate(lines) if s.startswith("# THE TRADES LOSS")) - 1
    last = next(i for i, s in enumerate(lines)
                if s.startswith("# ---") and "end of the TRADES loss" in s)
    assert last - first < 60
    namespace = {}
    exec(compile("import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"  # as the core
                 + "\n".join(lines[first:last + 1]), "pasted.py", "exec"), namespace)
    model, x, y = tiny_cnn().eval(), torch.rand(4, 1, 8, 8), torch.arange(4)
    eps = torch.tensor([0.0, 0.1, 0.2, 0.05])
    results = []
    for attack, loss in ((namespace["trades_attack"], namespace["trades_loss"]),
                         (iaat.trades_attack, iaat.trades_loss)):
        torch.manual_seed(3)
        x_adv = attack(model, x, eps, steps=4, step_size=lambda e: e / 4)
        results.append((x_adv, loss(model, x, x_adv, y, 6.0)[0]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _hand_average(snapshots, decay):
    """The average by its definition: a_1 = w_1, a_t = d_t a_{t-1} + (1 - d_t) w_t,
    d_t = min(decay, t / (9 + t)) for the t-th update."""
    avg = {k: v.clone() for k, v in snapshots[0].items()}
    for t, w in enumerate(snapshots[1:], start=2):
        d = min(decay, t / (9 + t))
        avg = {k: (d * avg[k] + (1 - d) * w[k]) if w[k].is_floating_point() else w[k].clone()
               for k in avg}
    return avg


@pytest.mark.parametrize("decay", [0.2, 0.999])  # 0.2 caps the warm-up from update 3 on
def test_weight_average_is_the_hand_computed_average(decay):
    cfg = iaat.make_config("digits", method="at", ema=decay, attack_steps=2)
    plain_cfg = iaat.make_config("digits", method="at", attack_steps=2)
    model = tiny_cnn()
    s = iaat.make_state(model, cfg, 64)
    plain = iaat.make_state(copy.deepcopy(model), plain_cfg, 64)
    snapshots = []
    for step in range(5):
        x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
        torch.manual_seed(step)
        iaat.train_step(s, x, y, torch.arange(16), cfg)
        torch.manual_seed(step)
        iaat.train_step(plain, x, y, torch.arange(16), plain_cfg)
        snapshots.append({k: v.clone() for k, v in s.model.state_dict().items()})
        # the raw weights are exactly those of the same steps without an average
        for a, b in zip(s.model.state_dict().values(), plain.model.state_dict().values()):
            assert torch.equal(a, b)
    assert plain_cfg.ema == 0 and plain.ema is None
    want = _hand_average(snapshots, decay)
    got = s.ema.module.state_dict()
    assert want.keys() == got.keys() and int(s.ema.n_averaged) == 5
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["0.weight"], s.model.state_dict()["0.weight"])


def test_default_runs_use_neither_trades_nor_the_average(monkeypatch):
    """Off unless asked for: the defaults are ce and no average, and a default step calls
    neither; a run folder's name is as it was."""
    cfg = iaat.make_config("digits")
    assert (cfg.method, cfg.loss, cfg.ema) == ("iaat", "ce", 0.0) and not iaat.uses_trades(cfg)
    for name in ("trades_attack", "trades_loss", "weight_average"):
        monkeypatch.setattr(iaat, name, lambda *a, **k: pytest.fail("called"))
    for method in ("iaat", "at", "clean"):
        c = iaat.make_config("digits", method=method, warmup=0, attack_steps=2)
        s = iaat.make_state(tiny_cnn(), c, 16)
        assert s.ema is None
        iaat.train_step(s, torch.rand(16, 1, 8, 8), torch.arange(16) % 10, torch.arange(16), c)
        assert str(iaat.run_dir(c)) == f"runs/digits-smallcnn-{method}-seed0-warmup0-attack_steps2"
    assert str(iaat.run_dir(iaat.make_config("digits", loss="trades", ema=0.999))) == \
        "runs/digits-smallcnn-iaat-seed0-losstrades-ema0.999"


@pytest.mark.slow
def test_ema_run_resumes_bit_for_bit_and_eval_reads_the_average(tmp_path):
    """Killed by SIGTERM mid-epoch and resumed: the same weights and average as in one go;
    the average is what `iaat eval --weights ema` evaluates, raw weights otherwise."""
    flags = [*QUICK, "--method", "trades", "--ema", "0.9", "--save-every", "2"]
    whole = tmp_path / "whole"
    r = run_cli(*flags, "--out", whole)
    assert r.returncode == 0, r.stderr
    summary = json.loads((whole / "summary.json").read_text())
    assert re.search(r"EMA natural \d\.\d{4} PGD \d\.\d{4}", r.stdout)
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(ROOT / "iaat.py"), *flags, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.communicate(timeout=120) and proc.returncode == 143
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) < (3, 0) and "ema" in stopped
    r = run_cli(*flags, "--out", out)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (whole, out))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["ema_updates"] == b["ema_updates"] == 3 * 6  # 192 images / 32 per step
    assert not all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])
    for weights, stem, key in (("ema", "eval_ema", "ema_natural_acc"), ("raw", "eval",
                                                                        "natural_acc")):
        r = run_cli("eval", whole, "--parts", "whitebox", "--whitebox", "2x1", "--weights",
                    weights)
        assert r.returncode == 0, r.stderr
        res = json.loads((whole / f"{stem}.json").read_text())
        assert res["weights"] == weights and res["loss"] == "trades"
        assert res["natural"] == pytest.approx(summary[key])
    r = run_cli("export", whole, tmp_path / "export", "--weights", "ema")
    assert r.returncode == 0, r.stderr
    exported = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    assert exported["iaat"]["weights"] == "ema"
    assert exported["iaat"]["evaluation"] == json.loads((whole / "eval_ema.json").read_text())
    names = {k: iaat_export.exported_key(k, None) for k in a["ema"]}  # digits: model.py's keys
    assert all(torch.equal(exported["state_dict"][names[k]], a["ema"][k]) for k in a["ema"])
    assert not torch.equal(exported["state_dict"][names["1.net.0.weight"]],
                           a["model"]["1.net.0.weight"])


def test_bad_trades_and_average_settings_fail_in_one_line(tmp_path):
    for flags, message in ((["--method", "at", "--loss", "trades"], "--loss trades is for"),
                           (["--ema", "1"], "--ema must be in [0, 1)"),
                           (["--method", "trades", "--amp", "fp16"], "no fp16 loss scaling"),
                           (["--trades-beta", "-1"], "--trades-beta must be")):
        r = run_cli(*flags, "--out", tmp_path / "never")
        assert r.returncode != 0 and message in r.stderr, (flags, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()
    run = tmp_path / "plain"
    assert run_cli(*QUICK, "--epochs", "1", "--out", run).returncode == 0
    r = run_cli("eval", run, "--weights", "ema", "--parts", "whitebox")
    assert r.returncode == 1 and "kept no weight average" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_trades_run_trains_at_eps_w_and_learns(tmp_path):
    """TRADES at the fixed radius on digits: the history holds eps_w, and training works
    (clean accuracy well above chance after a few epochs)."""
    cfg = iaat.make_config("digits", method="trades", epochs=4, n_train=640, eval_subset=100,
                           eval_steps=3, lr_milestones=(3,), out=str(tmp_path / "run"))
    summary = iaat.train(cfg, log=lambda msg: None)
    history = np.load(tmp_path / "run" / "eps_history.npy")
    assert summary["natural_acc"] > 0.5 and summary["loss"] == "trades"
    assert history.shape == (4, 640) and bool((abs(history - cfg.eps_w) < 1e-7).all())


def test_nn_module_of_a_weight_average_is_a_plain_model():
    """What the checkpoint stores: the average's module state, the same keys as the model."""
    model = tiny_cnn()
    avg = iaat.weight_average(model, 0.9)
    assert isinstance(avg.module, nn.Module)
    assert avg.module.state_dict().keys() == model.state_dict().keys()


@pytest.mark.slow
def test_the_baselines_table_script_end_to_end(tmp_path, capsys):
    """scripts/digits_baselines.py on tiny runs: every run and both evaluations of each, the
    table's rows and columns from them; a second call trains and evaluates nothing again."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits_baselines",
                                                  ROOT / "scripts" / "digits_baselines.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--seeds", "0", "1", "--methods", "at", "iaat-trades", "--runs", str(tmp_path),
            "--train-flags", "--epochs 2 --warmup 1 --n-train 128", "--eval-flags",
            "--n-examples 10", "--out", str(tmp_path / "table.md"), "--jobs", "1", "--threads",
            "1"]  # one process at a time: the suite's other worker has the other core
    assert script.main(argv) == 0
    for m in ("at", "iaat-trades"):
        for s in (0, 1):
            run = tmp_path / f"{m}-seed{s}"
            assert json.loads((run / "summary.json").read_text())["ema"] == 0.999
            for stem, weights in (("eval", "raw"), ("eval_ema", "ema")):
                res = json.loads((run / f"{stem}.json").read_text())
                assert res["complete"] and res["weights"] == weights and res["n_examples"] == 10
                assert "PGD-1000x2" in res["whitebox"] and "autoattack" in res
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[:2] for r in rows[1:]] == [
        ["| PGD-AT", "trained"], ["| PGD-AT", "average"], ["| IAAT, TRADES loss", "trained"],
        ["| IAAT, TRADES loss", "average"]]
    assert rows[1].endswith(" 1.00 |") and "AA after APGD-T" in rows[0]
    out = capsys.readouterr().out
    assert out.count("ok: python iaat.py") == 4 + 8
    assert script.main(argv) == 0  # done already: nothing runs again
    assert "ok: python iaat.py" not in capsys.readouterr().out
    assert (tmp_path / "table.md").read_text() == table
