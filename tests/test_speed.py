"""The speed techniques of docs/design.md are exact where they claim to be: the selection's
subset and early exit give plain Algorithm 2's eps, mixed-precision attacks keep the eps bound,
fp16 loss scaling keeps every gradient sign fp32 has, and the speed flags train and resume."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import iaat
import iaat_fp16
import iaat_notebook
import iaat_run
from conftest import tiny_cnn


def input_grad(model, x, y, precision, scale):
    with torch.autocast("cpu", dtype=precision, enabled=precision is not None):
        _, grad, used = iaat_fp16.fp16_input_grad(model, x, y, False, scale)
    return grad, used


def unscaled_fp16_grad(model, x, y):
    with torch.autocast("cpu", dtype=torch.float16):
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        return torch.autograd.grad(loss, x)[0]


def spread_problem(top=40.0):
    """A linear model and a batch whose margins run from about 0 (a gradient near 1) to 40
    (near e^-40, far below fp16's smallest 6e-8). Every term of every input gradient has the
    same sign, so fp16 cannot cancel a sum to 0: a 0 there is underflow and nothing else."""
    g = torch.Generator().manual_seed(0)
    d = 3 * 8 * 8
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 10)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(10, d, generator=g) * 0.4)
        model[1].weight[0] = -torch.rand(d, generator=g) * 0.4
        model[1].bias.copy_(torch.tensor([top] + [0.0] * 9))
    x = torch.rand(64, 3, 8, 8, generator=g) * torch.linspace(0, 1, 64)[:, None, None, None]
    return model, x, torch.zeros(64, dtype=torch.long)


def test_fp16_loss_scaling_keeps_every_sign_fp32_has(monkeypatch):
    model, x, y = spread_problem()
    ref, _ = input_grad(model, x, y, None, 1.0)
    assert (ref != 0).all()  # fp32 moves every pixel
    scaled, _ = input_grad(model, x, y, torch.float16, iaat_fp16.FP16_LOSS_SCALE)
    assert not (scaled.sign() == 0).any()
    assert torch.equal(scaled.sign(), ref.sign())
    # the test can fail: without loss scaling fp16 loses the confident samples' gradients,
    assert (unscaled_fp16_grad(model, x, y) == 0).sum() > 1000
    # and so does one factor for the whole batch, which the unsure samples hold down
    monkeypatch.setattr(iaat_fp16, "_couples_samples", lambda model: True)
    batch_scaled, _ = input_grad(model, x, y, torch.float16, iaat_fp16.FP16_LOSS_SCALE)
    assert (batch_scaled == 0).sum() > 1000


@pytest.mark.parametrize("top", [90.0, 100.0])
def test_fp16_scaling_survives_margins_near_fp32s_limit(top):
    """Margins of 50-100 give logit gradients of e^-50..e^-100, below fp32's normal range:
    the scaling (in float64) neither overflows to inf nor lowers the scale for the batch."""
    model, x, y = spread_problem(top)
    ref, _ = input_grad(model, x, y, None, 1.0)
    scaled, used = input_grad(model, x, y, torch.float16, iaat_fp16.FP16_LOSS_SCALE)
    assert torch.isfinite(scaled).all() and used == iaat_fp16.FP16_LOSS_SCALE
    moves = ref != 0  # fp32 itself loses the most confident samples here
    assert moves.float().mean() > 0.5
    assert torch.equal(scaled.sign()[moves], ref.sign()[moves])
    assert (scaled != 0).all()  # and fp16 keeps even those


@pytest.mark.parametrize("targeted", [False, True])
def test_fp16_targeted_and_untargeted_signs_match_fp32(targeted):
    model, x, y = spread_problem()
    target = (y + 1) % 10
    labels = target if targeted else y
    with torch.autocast("cpu", dtype=torch.float16):
        _, grad, _ = iaat_fp16.fp16_input_grad(model, x, labels, targeted)
    _, ref, _ = iaat_fp16.fp16_input_grad(model, x, labels, targeted)
    moves = ref != 0
    assert moves.float().mean() > 0.9
    assert not (grad == 0)[moves].any()
    # the targeted gradient sums terms of both signs, so fp16 rounding may flip a stray pixel
    assert (grad.sign() == ref.sign())[moves].float().mean() > 0.999


def test_fp16_loss_scaling_on_a_confident_conv_net():
    """On a conv net whose samples all have margins near 20, unscaled fp16 moves no pixel;
    scaled, it moves every pixel fp32 moves, in the direction of the exact (float64)
    gradient. fp32's own cross-entropy rounds 1 - p_y to 0 at such margins and drops the
    true class's term; the fp16 path computes it in float64, so it is the closer of the two."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[-1].bias[0] += 20  # every sample is class 0 with a margin of about 20
    x = torch.rand(64, 3, 8, 8)
    y = torch.zeros(64, dtype=torch.long)
    exact_x = x.double().requires_grad_(True)
    exact_loss = F.cross_entropy(copy.deepcopy(model).double()(exact_x), y, reduction="sum")
    exact, = torch.autograd.grad(exact_loss, exact_x)
    fp32, _ = input_grad(model, x, y, None, 1.0)
    scaled, _ = input_grad(model, x, y, torch.float16, iaat_fp16.FP16_LOSS_SCALE)
    assert (fp32 != 0).all()
    assert (unscaled_fp16_grad(model, x, y) == 0).all()  # fp16 alone: no pixel would move
    # fp16's own rounding (a ReLU flipped, a sum cancelled) may zero a stray pixel
    assert (scaled != 0).float().mean() > 0.999
    assert (scaled.sign() == exact.sign()).float().mean() > 0.99


def test_fp16_overflow_lowers_the_scale_and_the_gradient_stays_finite():
    # weights of 1e3 make the scaled gradient 2^16 * 1e3: far beyond fp16's 65504
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(1e3 / model[1].weight.abs().max())
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    ref, _ = input_grad(model, x, y, None, 1.0)
    grad, used = input_grad(model, x, y, torch.float16, iaat_fp16.FP16_LOSS_SCALE)
    assert used < iaat_fp16.FP16_LOSS_SCALE
    assert torch.isfinite(grad).all()
    assert (grad.sign() == ref.sign()).float().mean() > 0.99


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_mixed_precision_attacks_stay_in_the_ball(precision):
    model = tiny_cnn(in_ch=3).eval()
    x, y = torch.rand(50, 3, 8, 8), torch.randint(0, 10, (50,))
    eps = torch.rand(50) * 0.1
    eps[:5] = 0
    with torch.autocast("cpu", dtype=precision):
        x_adv = iaat.pgd_attack(model, x, y, eps, steps=5, step_size=0.03)
        new = iaat.select_epsilon(model, x, y, eps, gamma=0.02, beta=0.1, steps=5)
    assert x_adv.dtype == torch.float32
    assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-7).all()
    assert torch.equal(x_adv[:5], x[:5])
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()
    assert new.dtype == torch.float32 and torch.isfinite(new).all()


def test_subset_and_early_exit_give_plain_algorithm_2(monkeypatch):
    """Alg 2 written the plain way (the official code's way): both attacks on the whole batch,
    every step on every sample. Random starts come from a fixed per-image table, so each
    image starts from the same point however the batch around it is cut."""
    model = tiny_cnn(in_ch=3).eval()
    n = 300
    x, y = torch.rand(n, 3, 8, 8), torch.randint(0, 10, (n,))
    noise = torch.rand(n, 3, 8, 8) * 2 - 1

    def table_start(xs, eps):
        rows = (xs.flatten(1)[:, None, :] == x.flatten(1)[None]).all(2).float().argmax(1)
        return (xs + noise[rows] * eps).clamp(0, 1)
    monkeypatch.setattr(iaat, "uniform_start", table_start)
    prev, gamma, beta, steps, step = torch.rand(n) * 0.08, 0.02, 0.3, 8, 0.01
    fast = iaat.select_epsilon(model, x, y, prev, gamma=gamma, beta=beta, steps=steps,
                               step_size=step)
    up = iaat.pgd_fooled(model, x, y, prev + gamma, steps=steps, step_size=step,
                         early_exit=False)
    at_prev = iaat.pgd_fooled(model, x, y, prev, steps=steps, step_size=step, early_exit=False)
    chosen = torch.where(~up, prev + gamma, torch.where(~at_prev, prev, prev - gamma))
    plain = (1 - beta) * prev + beta * chosen.clamp(min=0)
    assert torch.equal(fast, plain)
    # all three branches of Alg 2 occur, so the comparison covers each of them
    assert (~up).any() and (up & ~at_prev).any() and (up & at_prev).any()


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_fp16_input_grad_outside_fp16_is_iaats_input_grad(precision):
    """iaat_fp16 does not import iaat; outside fp16 autocast its gradient is iaat.input_grad's,
    bit for bit (logits, gradient and state), untargeted and targeted."""
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for targeted in (False, True):
        with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
            ours = iaat_fp16.fp16_input_grad(model, x, y, targeted, "state")
            theirs = iaat.input_grad(model, x, y, targeted, "state")
        assert all(torch.equal(a, b) for a, b in zip(ours[:2], theirs[:2])) and ours[2] == "state"


def test_autocast_follows_the_flag():
    cpu = torch.device("cpu")
    with iaat.autocast(iaat.make_config(amp="bf16"), cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with iaat.autocast(iaat.make_config(), cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert not iaat.uses_channels_last(iaat.make_config(amp="bf16"), cpu)  # auto: CUDA only
    assert iaat.uses_channels_last(iaat.make_config(channels_last="on"), cpu)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [dict(amp="fp16", channels_last="on"), dict(amp="bf16")])
def test_mixed_precision_training_resumes_to_the_same_state(tmp_path, flags):
    """A run with --amp stopped after an epoch and resumed ends where an uninterrupted run does;
    the fp16 GradScaler's state travels in the checkpoint."""
    common = dict(epochs=3, warmup=1, n_train=256, eval_subset=0, seed=1, **flags)
    whole = iaat.train(iaat.make_config(out=str(tmp_path / "whole"), **common), log=lambda m: None)
    iaat.train(iaat.make_config(out=str(tmp_path / "cut"), **dict(common, epochs=1)),
               log=lambda m: None)
    cut = iaat.train(iaat.make_config(out=str(tmp_path / "cut"), **common), log=lambda m: None)
    assert whole["eps_memory_sha1_per_process"] == cut["eps_memory_sha1_per_process"]
    assert whole["model_sha1_per_process"] == cut["model_sha1_per_process"]
    ckpt = iaat_run.read_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert bool(ckpt["scaler"]) == (flags["amp"] == "fp16")
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["amp"] == flags["amp"]


def test_a_config_saved_before_the_speed_flags_still_matches(tmp_path):
    cfg = iaat.make_config(epochs=1, n_train=128, eval_subset=0, out=str(tmp_path / "r"))
    iaat.train(cfg, log=lambda m: None)
    path = tmp_path / "r" / "config.json"
    old = json.loads(path.read_text())
    for name in ("amp", "channels_last", "compile", "cudnn_benchmark", "select_steps",
                 "select_step_size"):
        del old[name]
    path.write_text(json.dumps(old))
    assert iaat_notebook.train_or_load(cfg, train_missing=False)["epochs"] == 1


@pytest.mark.slow
def test_compiled_model_trains_and_saves_the_plain_weights(tmp_path):
    common = dict(epochs=2, warmup=1, n_train=256, eval_subset=0, seed=2)
    plain = iaat.train(iaat.make_config(out=str(tmp_path / "plain"), **common), log=lambda m: None)
    fast = iaat.train(iaat.make_config(out=str(tmp_path / "fast"), compile=True,
                                       channels_last="on", **common), log=lambda m: None)
    a = iaat_run.read_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = iaat_run.read_checkpoint(tmp_path / "fast" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()  # no torch.compile "_orig_mod." prefix in the checkpoint
    # the same algorithm: kernels round differently, so the runs agree closely, not bitwise
    assert abs(fast["eps_mean_255"] - plain["eps_mean_255"]) < 0.5
    assert abs(fast["natural_acc"] - plain["natural_acc"]) < 0.05
