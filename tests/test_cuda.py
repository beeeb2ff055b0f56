"""The claims that only a GPU can check: fp16 and bf16 attacks with CUDA's own half-precision
kernels, and a training step with channels_last under autocast.

Marked `cuda`: the README's test command deselects them (`-m 'not cuda'` in pyproject.toml's
addopts), on every machine, with CUDA or without. They are run by `benchmarks/gpu_check.py`,
on the GPU, or with IAAT_TEST_DEVICE=cpu on the CPU (its --quick smoke test, which the suite
runs), so that they cannot rot; `pytest -m cuda tests/test_cuda.py` runs them by hand, and skips
them where IAAT_TEST_DEVICE is cuda (the default) and there is no CUDA."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import iaat
import iaat_fp16

DEVICE = os.environ.get("IAAT_TEST_DEVICE", "cuda")
N, SIDE = (32, 32) if DEVICE == "cuda" else (8, 16)  # a CPU run only checks that they work
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs CUDA (benchmarks/gpu_check.py runs these on a GPU)")]


def confident_net():
    """A conv net whose samples are all class 0 with a margin of about 20 (so fp16 gradients
    underflow), on DEVICE, in eval mode, with a batch and its float64 input gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[-1].bias[0] += 20
    x, y = torch.rand(64, 3, 8, 8), torch.zeros(64, dtype=torch.long)
    exact_x = x.double().requires_grad_(True)
    exact, = torch.autograd.grad(F.cross_entropy(copy.deepcopy(model).double()(exact_x), y,
                                                 reduction="sum"), exact_x)
    return model.to(DEVICE), x.to(DEVICE), y.to(DEVICE), exact.to(DEVICE)


def test_fp16_loss_scaling_keeps_the_gradient_sign_on_the_device():
    model, x, y, exact = confident_net()
    with torch.autocast(DEVICE, dtype=torch.float16):
        _, plain, _ = iaat.input_grad(model, x, y)
        _, scaled, scale = iaat_fp16.fp16_input_grad(model, x, y)
    assert (plain == 0).float().mean() > 0.9  # unscaled fp16: (almost) no pixel would move
    assert scale == iaat_fp16.FP16_LOSS_SCALE and torch.isfinite(scaled).all()
    assert (scaled != 0).float().mean() > 0.999
    assert (scaled.sign() == exact.sign()).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_attacks_stay_in_the_ball_on_the_device(dtype):
    torch.manual_seed(0)
    model = iaat.build_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3).to(DEVICE).eval()
    x, y = torch.rand(N, 3, SIDE, SIDE, device=DEVICE), torch.randint(0, 10, (N,), device=DEVICE)
    eps = torch.linspace(0, 16 / 255, N, device=DEVICE)
    grad_fn = iaat_fp16.fp16_input_grad if dtype == torch.float16 else None
    with torch.autocast(DEVICE, dtype=dtype):
        adv = iaat.pgd_attack(model, x, y, eps, steps=5, grad_fn=grad_fn)
        new = iaat.select_epsilon(model, x, y, eps, gamma=2 / 255, beta=0.1, steps=5,
                                  grad_fn=grad_fn)
    assert adv.dtype == torch.float32 and 0 <= adv.min() and adv.max() <= 1
    assert ((adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    assert torch.equal(adv[0], x[0])  # eps 0: unchanged
    assert (adv != x).any()
    candidates = torch.stack([0.9 * eps + 0.1 * (eps + 2 / 255), eps,
                              0.9 * eps + 0.1 * (eps - 2 / 255).clamp(min=0)], 1)
    assert ((new[:, None] - candidates).abs().amin(1) < 1e-6).all()  # Alg 2's three choices


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_channels_last_training_step_under_autocast(amp):
    cfg = iaat.make_config("cifar10", amp=amp, channels_last="on", attack_steps=3, warmup=0)
    torch.manual_seed(0)
    model = iaat.build_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3).to(DEVICE)
    s = iaat.make_state(model, cfg, 2 * N)
    assert model[1].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2 * N, 3, SIDE, SIDE, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y, idx = torch.randint(0, 10, (2 * N,), device=DEVICE), torch.arange(2 * N, device=DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    stats = iaat.train_step(s, x, y, idx, cfg)
    assert torch.isfinite(stats["loss"]) and int(stats["n"]) == 2 * N
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert (s.mem != cfg.eps_w).any()  # Alg 2 ran (no warmup) and wrote the memory
    assert s.scaler.is_enabled() == (amp == "fp16")
