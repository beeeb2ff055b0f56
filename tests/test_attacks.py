"""pgd_attack's contract (docs/design.md: the copyable core, the algorithm)."""
import torch
import torch.nn.functional as F

import iaat
from conftest import tiny_cnn


def _batch(n=32):
    return torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,))


def test_bound_holds_per_sample_and_stays_in_box():
    model = tiny_cnn()
    x, y = _batch()
    eps = torch.rand(len(x)) * 0.3
    eps[::4] = 0.0
    x_adv = iaat.pgd_attack(model, x, y, eps, steps=7, step_size=0.05)
    dist = (x_adv - x).abs().flatten(1).amax(1)
    assert torch.all(dist <= eps + 1e-6)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # the attack uses its budget: most samples with eps > 0 move by (almost) eps
    moved = dist[eps > 0] >= 0.9 * eps[eps > 0]
    assert moved.float().mean() > 0.8


def test_eps_zero_returns_input_unchanged():
    model = tiny_cnn()
    x, y = _batch()
    eps = torch.full((len(x),), 0.1)
    eps[:10] = 0
    x_adv = iaat.pgd_attack(model, x, y, eps, steps=5, step_size=0.05)
    assert torch.equal(x_adv[:10], x[:10])
    assert torch.equal(iaat.pgd_attack(model, x, y, 0.0, steps=5), x)
    # without a random start, what moves the others is the gradient steps, and they raise the loss
    x_adv = iaat.pgd_attack(model, x, y, eps, steps=5, step_size=0.05, random_start=False)
    assert torch.equal(x_adv[:10], x[:10])
    moved = (x_adv[10:] - x[10:]).abs().flatten(1).amax(1)
    assert (moved > 0.05 - 1e-6).all()  # at least one full step on some pixel of each
    with torch.no_grad():
        before = F.cross_entropy(model(x[10:]), y[10:], reduction="none")
        after = F.cross_entropy(model(x_adv[10:]), y[10:], reduction="none")
    assert (after > before).all()


def test_per_sample_step_size():
    model = tiny_cnn()
    x, y = _batch(8)
    step = torch.tensor([0.0, 0.01] * 4)
    x_adv = iaat.pgd_attack(model, x, y, 0.2, steps=3, step_size=step, random_start=False)
    dist = (x_adv - x).abs().flatten(1).amax(1)
    assert torch.all(dist[0::2] == 0)
    assert torch.all(dist[1::2] <= 0.03 + 1e-6) and torch.all(dist[1::2] > 0)


def _strength(model, x, y, x_adv):
    with torch.no_grad():
        logits = model(x_adv)
    return logits.argmax(1) != y, F.cross_entropy(logits, y, reduction="none")


def test_restarts_never_weaker_than_one_run():
    model = tiny_cnn().eval()
    x, _ = _batch(256)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correctly classified
    torch.manual_seed(1)
    one = iaat.pgd_attack(model, x, y, 0.02, steps=2, step_size=0.005)
    torch.manual_seed(1)  # the first restart draws the same random start as the single run
    many = iaat.pgd_attack(model, x, y, 0.02, steps=2, step_size=0.005, restarts=5)
    fooled1, loss1 = _strength(model, x, y, one)
    fooled5, loss5 = _strength(model, x, y, many)
    assert torch.all(fooled5 | ~fooled1)  # fooled by one run => fooled by the restarts
    both_robust = ~fooled1 & ~fooled5
    assert torch.all(loss5[both_robust] >= loss1[both_robust] - 1e-6)
    assert 0 < fooled1.sum() < fooled5.sum() < len(y)  # a test that can tell: restarts helped


def test_targeted_moves_towards_target():
    model = tiny_cnn().eval()
    x, y = _batch(64)
    target = (y + 1) % 10
    x_t = iaat.pgd_attack(model, x, target, 0.3, steps=10, step_size=0.05, targeted=True)
    x_u = iaat.pgd_attack(model, x, y, 0.3, steps=10, step_size=0.05)
    with torch.no_grad():
        hit_t = (model(x_t).argmax(1) == target).float().mean()
        hit_u = (model(x_u).argmax(1) == target).float().mean()
    assert hit_t > 0.5 and hit_t > hit_u


def test_model_mode_preserved_and_no_parameter_grads():
    model = tiny_cnn()
    x, y = _batch()
    x.requires_grad_(True)  # a caller's leaf input must not collect a gradient either
    for training in (True, False):
        model.train(training)
        x_adv = iaat.pgd_attack(model, x, y, 0.1, steps=3, restarts=2)
        assert model.training is training
        assert all(p.grad is None for p in model.parameters())
        assert x.grad is None and not x_adv.requires_grad


def test_model_mode_gives_each_submodule_its_own_mode_back():
    model = tiny_cnn().train()
    model[1].eval()  # a BatchNorm frozen on purpose inside a training model
    with iaat.model_mode(model, False):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[1].training
    iaat.select_epsilon(model, *_batch(8), torch.full((8,), 0.1), gamma=0.05, beta=0.1, steps=2)
    assert model.training and not model[1].training


def test_random_start_stays_in_the_box():
    model = tiny_cnn()
    x = torch.cat([torch.zeros(8, 1, 8, 8), torch.ones(8, 1, 8, 8)])
    y = torch.zeros(16, dtype=torch.long)
    x_adv = iaat.pgd_attack(model, x, y, 0.3, steps=0)  # the random start alone
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv != x).any()


def test_restarts_must_be_positive():
    import pytest
    with pytest.raises(ValueError, match="restarts"):
        iaat.pgd_attack(tiny_cnn(), *_batch(4), 0.1, restarts=0)


class FooledOnce(torch.nn.Module):
    """Classifies every input as class 0, except on its `bad_call`-th forward pass (class 1).
    The logits still depend on x, so PGD has a gradient to follow."""
    def __init__(self, bad_call):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x):
        self.calls += 1
        s = x.flatten(1).sum(1, keepdim=True) * 1e-3
        bias = torch.tensor([0.0, 5.0]) if self.calls == self.bad_call else torch.tensor([5.0, 0.0])
        return torch.cat([s, -s], 1) + bias


def test_fooled_means_some_iterate_is_misclassified():
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    for bad_call in (1, 3, 6):  # the random start, a middle iterate, the last iterate (5 steps)
        assert iaat.pgd_fooled(FooledOnce(bad_call), x, y, 0.1, steps=5, step_size=0.01).all()
    assert not iaat.pgd_fooled(FooledOnce(99), x, y, 0.1, steps=5, step_size=0.01).any()


def test_attack_under_no_grad_context():
    model = tiny_cnn().eval()
    x, y = _batch()
    with torch.no_grad():
        x_adv = iaat.pgd_attack(model, x, y, 0.1, steps=3)
    assert (x_adv - x).abs().max() > 0


def test_bad_eps_shape_is_rejected():
    model = tiny_cnn()
    x, y = _batch(4)
    try:
        iaat.pgd_attack(model, x, y, torch.zeros(3))
    except ValueError as err:
        assert "shape (4,)" in str(err)
    else:
        raise AssertionError("a (3,) eps for a batch of 4 was accepted")


def test_models_take_images_in_unit_range_and_count_parameters():
    import pytest
    x = torch.rand(2, 3, 32, 32)
    expected = {"resnet18": (11.17, 11.18), "wrn32-10": (46.15, 46.17), "smallcnn": (0.05, 0.2)}
    for name, (lo, hi) in expected.items():
        model = iaat.build_model(name, 10, (0.5,) * 3, (0.25,) * 3).eval()
        assert isinstance(model[0], iaat.Normalize)  # normalisation lives inside the model
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        assert lo <= millions <= hi, (name, millions)
        if name != "wrn32-10":  # WRN-34-10 is slow on CPU; its size check above suffices
            assert model(x).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        iaat.WideResNet(depth=32)
