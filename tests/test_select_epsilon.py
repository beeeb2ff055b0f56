"""select_epsilon is paper Algorithm 2, checked against a frozen linear classifier whose exact
L-inf distance to the decision boundary inside [0,1] is known in closed form."""
import numpy as np
import pytest
import torch

import iaat
from conftest import distance_to_boundary, frozen_linear, tiny_cnn

D, GAMMA, STEPS, STEP = 24, 0.02, 20, 0.05  # 20 steps of 0.05 reach any corner of a 0.5-ball


def linear_problem(n=300, seed=0):
    """A frozen 2-class linear model f(x) = W x + b, inputs x in [0,1]^D and labels y."""
    g = torch.Generator().manual_seed(seed)
    model = frozen_linear(D, g)
    x = torch.rand(n, 1, 4, D // 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correctly classified
    return model, x, y


def alg2_reference(d, prev, gamma, beta):
    """Algorithm 2 written out with the exact answer 'is sample i fooled at radius e' = e > d_i."""
    chosen = np.where(d > prev + gamma, prev + gamma, np.where(d > prev, prev, prev - gamma))
    return (1 - beta) * prev + beta * np.maximum(chosen, 0)


def _problem_with_prev(seed=0):
    model, x, y = linear_problem(seed=seed)
    d = distance_to_boundary(model, x, y)
    keep = (d > 1.6 * GAMMA) & (d < 0.4)
    model, x, y, d = model, x[keep], y[keep], d[keep]
    offsets = torch.tensor([-1.5, -0.5, 0.5])[torch.arange(len(d)) % 3] * GAMMA  # all 3 branches
    prev = (d + offsets).clamp(min=0)
    return model, x, y, d, prev


def test_linear_closed_form_matches_pgd():
    """The oracle itself: PGD fools a sample exactly when the radius exceeds its distance."""
    model, x, y, d, prev = _problem_with_prev()
    for scale in (0.8, 1.2):
        fooled = iaat.pgd_fooled(model, x, y, d * scale, steps=STEPS, step_size=STEP)
        assert torch.equal(fooled, torch.full_like(fooled, scale > 1))


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.35])
def test_select_epsilon_is_algorithm_2(beta):
    model, x, y, d, prev = _problem_with_prev()
    assert len(d) > 100
    eps = iaat.select_epsilon(model, x, y, prev, gamma=GAMMA, beta=beta, steps=STEPS,
                              step_size=STEP)
    want = alg2_reference(d.numpy(), prev.numpy(), GAMMA, beta)
    np.testing.assert_allclose(eps.numpy(), want, atol=1e-6)
    if beta == 1.0:  # every branch occurs: up, stay, down
        up, stay, down = prev + GAMMA, prev, (prev - GAMMA).clamp(min=0)
        assert all(torch.isclose(eps, c, atol=1e-6).sum() > 20 for c in (up, stay, down))


def test_down_candidate_is_clipped_at_zero_before_the_ema():
    model, x, y = linear_problem(n=2000, seed=2)
    d = distance_to_boundary(model, x, y)
    keep = (d > 0.05 * GAMMA) & (d < 0.5 * GAMMA)  # fooled even at prev = 0.75 gamma
    x, y = x[keep], y[keep]
    assert len(y) >= 5
    prev = torch.full((len(y),), 0.75 * GAMMA)
    eps = iaat.select_epsilon(model, x, y, prev, gamma=GAMMA, beta=0.1, steps=STEPS, step_size=STEP)
    # chosen = max(prev - gamma, 0) = 0, so eps = 0.9 prev; clipping after the EMA would give
    # 0.9 prev + 0.1 (prev - gamma) = 0.9 prev - 0.025 gamma
    torch.testing.assert_close(eps, 0.9 * prev, atol=1e-7, rtol=0)


def test_eps_min_and_eps_max_clip_the_result():
    model, x, y, d, prev = _problem_with_prev()
    eps = iaat.select_epsilon(model, x, y, prev, gamma=GAMMA, beta=1.0, steps=STEPS,
                              step_size=STEP, eps_min=0.05, eps_max=0.2)
    want = np.clip(alg2_reference(d.numpy(), prev.numpy(), GAMMA, 1.0), 0.05, 0.2)
    np.testing.assert_allclose(eps.numpy(), want, atol=1e-6)
    assert (want == 0.05).any() and (want == 0.2).any()  # both clips are exercised


def test_second_attack_runs_on_the_fooled_subset_only(monkeypatch):
    model, x, y, d, prev = _problem_with_prev()
    sizes, real = [], iaat.pgd_fooled
    monkeypatch.setattr(iaat, "pgd_fooled", lambda m, x, *a, **k: sizes.append(len(x)) or
                        real(m, x, *a, **k))
    iaat.select_epsilon(model, x, y, prev, gamma=GAMMA, beta=0.1, steps=STEPS, step_size=STEP)
    fooled_up = int((d < prev + GAMMA).sum())
    assert sizes == [len(x), fooled_up] and 0 < fooled_up < len(x)


def test_selection_is_a_measurement_in_eval_mode():
    model = tiny_cnn().train()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    iaat.select_epsilon(model, x, y, torch.full((64,), 0.1), gamma=0.05, beta=0.1, steps=3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_early_exit_changes_no_decision():
    model = tiny_cnn().eval()
    x, y = torch.rand(200, 1, 8, 8), torch.randint(0, 10, (200,))
    eps = torch.rand(200) * 0.1
    torch.manual_seed(3)
    fast = iaat.pgd_fooled(model, x, y, eps, steps=10, step_size=0.01, early_exit=True)
    torch.manual_seed(3)
    slow = iaat.pgd_fooled(model, x, y, eps, steps=10, step_size=0.01, early_exit=False)
    assert torch.equal(fast, slow)
    assert 0 < fast.sum() < len(fast)


def test_line_search_finds_the_largest_surviving_radius():
    model, x, y = linear_problem(seed=1)
    d = distance_to_boundary(model, x, y)
    eta, top = 0.03, 0.3
    keep = ((d / eta) - (d / eta).floor() > 0.05) & ((d / eta).ceil() - d / eta > 0.05)
    x, y, d = x[keep], y[keep], d[keep]
    eps = iaat.line_search_epsilon(model, x, y, eta=eta, eps_max=top, steps=STEPS, step_size=STEP)
    want = torch.clamp((d / eta).floor() * eta, max=top)
    torch.testing.assert_close(eps, want, atol=1e-6, rtol=0)
    assert (eps == 0).any() and (eps == torch.tensor(top)).any() and ((eps > 0) & (eps < top)).any()


def test_pgd_fooled_turns_cudnn_benchmark_off_and_restores_it():
    """Its batch shrinks as samples fall: benchmark mode would time every new size again."""
    seen = []
    model = tiny_cnn()
    forward = model.forward
    model.forward = lambda x: (seen.append(torch.backends.cudnn.benchmark), forward(x))[1]
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    was = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        iaat.pgd_fooled(model, x, y, 0.3, steps=3)
        assert seen and not any(seen)
        assert torch.backends.cudnn.benchmark is True
        with pytest.raises(ValueError):
            iaat.pgd_fooled(model, x, y, torch.ones(3))  # a wrong shape: restored all the same
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = was
