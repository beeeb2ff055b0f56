"""benchmarks/bench.py: its smoke run writes and prints the three ratios with their targets,
the hardware and the command; official_style_step really does the official trainer's extra
parameter-gradient work, and trains. No timing asserts: whether a figure meets its target is
the script's to report, not a test's to decide on a shared machine."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

import iaat
import iaat_fp16
from conftest import ROOT, tiny_cnn

BENCH = ROOT / "benchmarks" / "bench.py"
_spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = sys.modules["bench"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench)


def run_bench(*args, timeout=300):
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `--quick` run (a few seconds on 2 CPU cores): its JSON and its stdout."""
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = run_bench("--quick", "--json", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text()), proc.stdout


def test_quick_run_stores_three_ratios_with_their_targets(quick):
    res, _ = quick
    assert set(res["figures"]) == set(bench.TARGETS) == {"pgd", "iaat_over_at",
                                                         "ours_over_official"}
    assert bench.TARGETS == {"pgd": 1.05, "iaat_over_at": 2.0, "ours_over_official": 1.0}
    for key, fig in res["figures"].items():
        assert fig["target"] == bench.TARGETS[key]
        assert math.isfinite(fig["ratio"]) and fig["ratio"] > 0
        assert fig["met"] == (fig["ratio"] <= fig["target"])
        assert fig["margin"] == pytest.approx(fig["target"] - fig["ratio"])
        repeats = res["settings"]["pgd_repeats" if key == "pgd" else "repeats"]
        assert len(fig["ratios"]) == repeats == 2
    for name in ("pgd_at", "iaat", "official"):
        assert res["epochs"][name]["images_per_s"] > 0
    sel = res["selection"]
    assert 0 <= sel["fooled_at_prev_plus_gamma"] <= 1
    assert sel["second_attack_subset_fraction"] == pytest.approx(sel["fooled_at_prev_plus_gamma"])
    assert sum(sel["chosen"].values()) == pytest.approx(1)


def test_quick_run_stores_hardware_command_and_settings(quick):
    res, _ = quick
    hw = res["hardware"]
    assert hw["device"] == "cpu" and hw["cpu"] and hw["cpu_cores"] >= 1
    assert hw["torch_threads"] == res["settings"]["threads"] >= 1
    assert res["torch"] == torch.__version__
    assert "bench.py" in res["command"] and "--quick" in res["command"]
    s = res["settings"]
    assert (s["model"], s["data"], s["amp"], s["batch"]) == ("smallcnn", "digits", "none", 64)
    assert s["timed_epoch"] >= 1  # after warm-up, so Algorithm 2 ran
    assert res["mfu"] is None  # only for resnet18 on CUDA


def test_quick_run_prints_the_table(quick):
    res, out = quick
    assert "| figure | ratio (median) | target |" in out
    for key, fig in res["figures"].items():
        assert bench.NAMES[key] in out
        assert bench.verdict(fig) in out  # "1.03 (target <= 1.05: met, 0.02 below)"
    assert "images/s" in out and "fooled at prev + gamma" in out
    assert f"command: {res['command']}" in out and res["hardware"]["cpu"] in out


@pytest.mark.slow
def test_bad_input_is_a_one_line_error(tmp_path):
    for args in (["--batch", "0"], ["--amp", "fp8"], ["--n-images", "10"]):
        proc = run_bench(*args, "--json", tmp_path / "x.json", timeout=120)
        assert proc.returncode != 0
        assert proc.stderr.startswith("bench: error:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def _batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _count_param_grads(model) -> list:
    """A counter of the backward passes that compute the first weight's gradient."""
    count = [0]
    next(model.parameters()).register_hook(lambda g: count.__setitem__(0, count[0] + 1))
    return count


def test_official_attack_fills_parameter_grads_and_ours_does_not():
    x, y = _batch()
    eps = torch.full((len(y),), 0.1)
    model = tiny_cnn().train()
    x_adv = bench.official_pgd(model, x, y, eps, steps=3, min_step=0.02)
    assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    iaat.pgd_attack(model, x, y, eps, steps=3, step_size=0.02)
    assert all(p.grad is None for p in model.parameters())


def test_official_style_step_takes_parameter_gradients_in_every_attack_step():
    """3 attacks of k steps with loss.backward() plus the training backward: 3k + 1 backward
    passes through the weights, against the single one of iaat.train_step."""
    cfg = iaat.make_config("digits", attack_steps=3)
    x, y = _batch()
    idx = torch.arange(len(y))
    counts = {}
    for name in ("official", "ours"):
        torch.manual_seed(0)
        model = tiny_cnn()
        s = iaat.make_state(model, cfg, len(y))  # the eps memory starts at eps_w
        s.epoch = cfg.warmup
        count = _count_param_grads(model)
        if name == "official":
            bench.official_style_step(model, s.opt, x, y, idx, s.mem, cfg)
        else:
            iaat.train_step(s, x, y, idx, cfg)
        counts[name] = count[0]
    assert counts == {"official": 3 * cfg.attack_steps + 1, "ours": 1}


def test_official_style_step_trains_and_updates_the_memory_by_algorithm_2():
    cfg = iaat.make_config("digits", attack_steps=3)
    x, y = _batch(48)
    idx = torch.arange(8, 40)  # a batch of 32 of 48 images; the others' memory stays
    model = tiny_cnn()
    s = iaat.make_state(model, cfg, 48)
    before = [p.detach().clone() for p in model.parameters()]
    mem = s.mem
    out = bench.official_style_step(model, s.opt, x[idx], y[idx], idx, mem, cfg)
    assert math.isfinite(float(out["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.equal(out["eps"], mem[idx])
    assert (mem[:8] == cfg.eps_w).all() and (mem[40:] == cfg.eps_w).all()
    # (1 - beta) prev + beta * chosen, chosen in {prev + gamma, prev, prev - gamma, 0 if wrong}
    prev, b, g = cfg.eps_w, cfg.beta, cfg.gamma
    allowed = torch.tensor([prev + b * g, prev, prev - b * g, (1 - b) * prev])
    assert ((mem[idx][:, None] - allowed).abs().amin(1) < 1e-6).all()
    assert (mem[idx] != prev).any()


def test_counting_selection_counts_and_puts_iaat_back():
    cfg = iaat.make_config("digits", attack_steps=3)
    x, y = _batch()
    model = tiny_cnn().eval()
    originals = (iaat.pgd_fooled, iaat.input_grad, iaat.select_epsilon, iaat_fp16.fp16_input_grad,
                 iaat.fp16_input_grad)
    with bench.counting_selection() as stats:
        iaat.select_epsilon(model, x, y, torch.full((len(y),), 0.05), gamma=cfg.gamma,
                            beta=cfg.beta, steps=3)
    assert (iaat.pgd_fooled, iaat.input_grad, iaat.select_epsilon, iaat_fp16.fp16_input_grad,
            iaat.fp16_input_grad) == originals
    assert stats["calls"][0][0] == len(y)
    if len(stats["calls"]) > 1:  # the second attack runs on those fooled at prev + gamma
        assert stats["calls"][1][0] == stats["calls"][0][1]
    assert 0 < stats["grad_rows"]["selection"] <= 2 * 3 * len(y)
    assert stats["grad_rows"]["training"] == 0


def test_counting_selection_counts_fp16_input_gradients_once():
    """Under --amp fp16 the attacks take iaat_fp16.fp16_input_grad; each row of an input
    gradient is counted once, inside fp16 autocast and outside it: as many as the model's
    forward passes with gradients on."""
    cfg = iaat.make_config("digits", attack_steps=3)
    x, y = _batch()
    model = tiny_cnn().eval()
    rows = [0]
    model.register_forward_hook(
        lambda m, args, out: rows.__setitem__(0, rows[0] + len(args[0]) * torch.is_grad_enabled()))
    for fp16 in (True, False):
        rows[0] = 0
        with bench.counting_selection() as stats, \
                torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            iaat.select_epsilon(model, x, y, torch.full((len(y),), 0.05), gamma=cfg.gamma,
                                beta=cfg.beta, steps=3, grad_fn=iaat_fp16.fp16_input_grad)
        assert stats["grad_rows"]["selection"] == rows[0] > 0


def test_counting_selection_counts_the_training_paths_fp16_gradients():
    """Through iaat.choose_epsilon with --amp fp16 (the path bench.py measures), the rows of the
    selection's fp16 input gradients are counted."""
    cfg = iaat.make_config("digits", attack_steps=3, amp="fp16", warmup=0)
    x, y = _batch()
    model = tiny_cnn().eval()
    mem = torch.full((len(y),), 0.05)
    with bench.counting_selection() as stats, torch.autocast("cpu", dtype=torch.float16):
        iaat.choose_epsilon(model, x, y, torch.arange(len(y)), mem, 0, cfg)
    assert 0 < stats["grad_rows"]["selection"] <= 2 * 4 * len(y)
