"""AutoAttack and the sanity flags: our driver of the reference AutoAttack (pyautoattack) gives
the reference's standard-version result, runs its full iteration counts, is never above PGD,
and the gradient-masking flags fire on masked models and stay quiet on a normal one."""
import collections

import pytest
import torch
import torch.nn as nn

import iaat_eval
import iaat_autoattack
import iaat_report

EPS, STEP = 0.2, 0.05  # the digits preset's test radius and step


def _u8(x):
    return (x * 255).round().to(torch.uint8)


@pytest.mark.slow
def test_autoattack_equals_the_reference_and_is_below_pgd_1000x2(trained):
    """On 100 test images: our stage-by-stage driver gives the result of calling the reference
    directly (AutoAttack(model, norm='Linf', eps, version='standard').run_standard_evaluation),
    image by image, and AutoAttack is at most PGD-1000 x 2 on the same images."""
    from pyautoattack import AutoAttack
    model, x, y = trained
    idx = iaat_eval.test_subset(len(y), 100, seed=0, device="cpu")
    x, y = x[idx], y[idx]
    info = {}
    rows = iaat_autoattack.autoattack_correct(model, _u8(x), y, eps=EPS, seed=0,  # default batch
                                              info=info)
    ref = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device="cpu")
    x_adv, y_adv = ref.run_standard_evaluation(_u8(x).float() / 255, y)  # its default batch
    ours, theirs = rows[-1].float().mean().item(), (y_adv == y).float().mean().item()
    assert abs(ours - theirs) <= 0.005 and torch.equal(rows[-1], y_adv == y), (ours, theirs)
    # in several batches, each drawing its own random starts: the same at the same batch size
    few = slice(0, 40)
    small = iaat_autoattack.autoattack_correct(model, _u8(x[few]), y[few], eps=EPS, seed=0,
                                               batch_size=16)
    ref = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device="cpu")
    _, y_small = ref.run_standard_evaluation(_u8(x[few]).float() / 255, y[few], batch_size=16)
    assert torch.equal(small[-1], y_small == y[few])
    natural = (model(x).argmax(1) == y).float().mean().item()
    assert 0.05 < ours < natural - 0.3, "the model should be partly robust for a meaningful check"
    # each stage attacks the survivors of the last: the rows only lose images
    assert all(not (b & ~a).any() for a, b in zip(rows, rows[1:]))
    assert info["max_linf_255"] <= EPS * 255 + 1e-3 and info["version"] == "standard"
    assert info["batch_size"] == iaat_autoattack.AUTOATTACK_BATCH == 250  # the reference's default
    torch.manual_seed(0)
    pgd = iaat_eval.attack_correct(model, x, y, eps=EPS, steps=1000, step_size=STEP, restarts=2)
    assert ours <= pgd.float().mean().item(), (ours, pgd.float().mean().item())


class MarginModel(nn.Module):
    """A linear classifier whose class 0 leads by 100: no image within eps 0.2 leaves class 0,
    so every attack runs its whole budget on every image."""
    def __init__(self, classes=10):
        super().__init__()
        self.lin = nn.Linear(64, classes)
        with torch.no_grad():
            self.lin.weight.mul_(0.1)
            self.lin.bias.zero_()
            self.lin.bias[0] = 100.0

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_autoattack_is_the_standard_version():
    """The settings Croce & Hein's standard version prescribes, read from the objects that run
    (torchattacks' AutoAttack runs 10 iterations and fails this)."""
    aa = iaat_autoattack.reference_autoattack(MarginModel(), eps=EPS, seed=0)
    assert aa.version == "standard" and aa.norm == "Linf" and aa.epsilon == EPS
    assert aa.attacks_to_run == list(iaat_autoattack.AUTOATTACK_STAGES)
    assert (aa.apgd.n_iter, aa.apgd.n_restarts) == (100, 1)
    assert (aa.apgd_targeted.n_iter, aa.apgd_targeted.n_restarts,
            aa.apgd_targeted.n_target_classes) == (100, 1, 9)
    assert (aa.fab.n_iter, aa.fab.n_target_classes) == (100, 9)
    assert aa.square.n_queries == 5000


@pytest.mark.parametrize("classes", [10, 100])
def test_autoattack_runs_its_full_budget(classes):
    """Counted through a forward hook on a model no attack can fool, with 10 and 100 classes:
    APGD-CE makes 100 gradient steps (one restart), APGD-T 100 against each of 9 targets and
    FAB-T 100 per target (one restart each: two would double the count; 99 targets on
    CIFAR-100 would be 11 times it), and Square 5000 queries (gradient-free forward passes)."""
    torch.manual_seed(0)
    model = MarginModel(classes).eval()
    calls = collections.Counter()
    model.register_forward_hook(lambda m, inp, out: calls.update([torch.is_grad_enabled()]))
    x, y = (torch.rand(3, 1, 8, 8) * 255).to(torch.uint8), torch.zeros(3, dtype=torch.long)
    counted, info = {}, {}
    for stage in iaat_autoattack.AUTOATTACK_STAGES:
        calls.clear()
        rows = iaat_autoattack.autoattack_correct(model, x, y, eps=EPS, stages=(stage,), info=info)
        assert rows.all(), stage
        counted[stage] = dict(calls)
        assert info["version"] == f"standard stages only: {stage}"  # one stage is not AutoAttack
        settings = info["settings"][stage]
        assert settings.get("n_restarts", 1) == 1 and settings.get("n_target_classes", 9) == 9
    assert 100 <= counted["apgd-ce"][True] < 200
    assert 9 * 100 <= counted["apgd-t"][True] < 10 * 100
    assert 9 * 100 <= counted["fab-t"][True] < 10 * 100
    assert 5000 <= counted["square"][False] < 5100
    assert all(p.grad is None for p in model.parameters())  # FAB's backward() filled none


# ---------------------------------------------------------------- sanity flags, unit

NORMAL = {"natural": 0.97, "n_examples": 500, "eps_255": 51.0, "targeted": "none",
          "whitebox": {"PGD-10x5": 0.53, "PGD-100x5": 0.51, "PGD-1000x2": 0.52},
          "transfer": 0.68, "autoattack": 0.49,
          "autoattack_stages": {"APGD-CE": 0.52, "APGD-T": 0.495, "FAB-T": 0.49, "Square": 0.49},
          "autoattack_details": {"warnings": []},
          "apgd": 0.495, "apgd_stages": {"APGD-CE": 0.52, "APGD-T": 0.495},
          "apgd_details": {"warnings": []},
          "eps_sweep": {"eps_255": [0, 25.5, 51, 76.5, 102], "acc": [0.97, 0.9, 0.52, 0.2, 0.05]},
          "steps_sweep": {"steps": [1, 10, 100, 1000], "acc": [0.8, 0.56, 0.554, 0.554]}}


def _with(**changes):
    r = {**NORMAL}
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            r[outer] = {**r[outer], inner: value}
        else:
            r[key] = value
    return r


@pytest.mark.parametrize("flag,result", [
    ("transfer_beats_whitebox", _with(transfer=0.45)),
    ("square_beats_gradient_attacks", _with(**{"autoattack_stages.Square": 0.30}, autoattack=0.30)),
    ("eps_sweep_rises", _with(**{"eps_sweep.acc": [0.97, 0.9, 0.52, 0.6, 0.05]})),
    ("eps_sweep_does_not_fall", _with(**{"eps_sweep.acc": [0.97, 0.96, 0.95, 0.9, 0.85]})),
    ("autoattack_above_pgd", _with(autoattack=0.60)),
    ("apgd_above_pgd", _with(apgd=0.60)),
    ("attack_not_converged", _with(**{"steps_sweep.acc": [0.8, 0.75, 0.7, 0.55]})),  # 100 -> 1000
    ("attack_not_converged", _with(**{"steps_sweep.acc": [0.8, 0.7, 0.65, 0.64]})),  # x1 -> x2
    ("autoattack_warning", _with(**{"autoattack_details.warnings": ["zero gradient"]})),
    ("apgd_warning", _with(**{"apgd_details.warnings": ["zero gradient"]})),
])
def test_each_flag_fires_alone_on_a_result_built_for_it(flag, result):
    assert iaat_report.sanity_flags(NORMAL) == []
    flags = iaat_report.sanity_flags(result)
    assert [f["flag"] for f in flags] == [flag]
    f = flags[0]
    assert ("zero gradient" if flag.endswith("_warning") else "%") in f["evidence"]
    # a flag of one part points to that part's JSON, and only AutoAttack's is called AutoAttack
    part = flag.split("_")[0]
    if part in iaat_autoattack.AUTOATTACK_PARTS:
        assert f"{part}_details.warnings" in f["try"], f["try"]
        assert f["meaning"].startswith("AutoAttack") == (flag == "autoattack_above_pgd")


def test_every_flag_is_explained_in_the_docs():
    """Each flag a result can raise has a row in the README's table of flags."""
    from conftest import ROOT
    doc = (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for flag, (meaning, remedy) in iaat_report.FLAGS.items():
        assert f"| `{flag}` |" in doc, flag
        assert len(meaning) > 40 and len(remedy) > 20, flag


def test_flags_stay_within_the_noise_and_the_protocol():
    # differences of one image, or of less than a point, are noise
    assert iaat_report.sanity_flags(_with(transfer=0.505, autoattack=0.515)) == []
    # a random-targeted white-box attack may be weaker than an untargeted transfer attack
    assert iaat_report.sanity_flags(_with(transfer=0.45, targeted="random")) == []
    # PGD-1 -> PGD-10 is not convergence (it is outside the last tenfold of the steps)
    assert iaat_report.sanity_flags(_with(**{"steps_sweep.acc": [0.99, 0.56, 0.554, 0.554]})) == []
    # a sweep that stops at the evaluation radius cannot tell whether accuracy falls to 0
    stops = {"eps_255": [0, 25.5, 51], "acc": [0.97, 0.9, 0.8]}
    assert iaat_report.sanity_flags(_with(eps_sweep=stops)) == []
    # an eval.json from before the reference AutoAttack (no details) is not compared with PGD
    old = {k: v for k, v in _with(autoattack=0.6).items() if k != "autoattack_details"}
    assert iaat_report.sanity_flags(old) == []
    # the table names the flags raised, and says so when none are
    row = iaat_report.eval_table([{**_with(transfer=0.45), "label": "m",
                                 "flags": iaat_report.sanity_flags(_with(transfer=0.45))}])
    assert row.splitlines()[0].endswith("| flags |") and "transfer_beats_whitebox |" in row


# ---------------------------------------------------------------- sanity flags, end to end

class Shattered(nn.Module):
    """The model plus a tiny, fast-oscillating term: the same predictions (logits move by at
    most about 0.05), but an input gradient that points nowhere useful (shattered gradients)."""
    def __init__(self, model, amp=1e-3, freq=1e4):
        super().__init__()
        self.model, self.amp, self.freq = model, amp, freq
        self.register_buffer("mix", torch.randn(64, 10, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.model(x) + self.amp * torch.sin(self.freq * x).flatten(1) @ self.mix


def _protocol(model, surrogate, x, y, parts, eps=0.1):
    """A short protocol at the model's training radius, the sweep out to 3 times it."""
    ev = dict(iaat_eval.EVAL_PRESETS["digits"], parts=parts, targeted="none", n_examples=None,
              seed=0, batch_size=500, eps=eps, whitebox=((100, 1), (100, 3)), transfer=(100, 1),
              sweep_attack=(20, 1), eps_sweep=(0.0, 0.05, 0.1, 0.2, 0.3),
              steps_sweep=(10, 50, 100))
    return iaat_eval.run_evaluation(model, _u8(x), y, ev=ev, num_classes=10, surrogate=surrogate)


@pytest.mark.slow
def test_flags_fire_on_a_masked_model_and_stay_quiet_on_the_normal_one(trained, runs):
    model, x, y = trained
    idx = iaat_eval.test_subset(len(y), 150, seed=0, device="cpu")
    x, y = x[idx], y[idx]
    surrogate = iaat_eval.load_run(runs[1], torch.device("cpu"))[0]
    masked = Shattered(model).eval()
    with torch.no_grad():
        assert torch.equal(masked(x).argmax(1), model(x).argmax(1))
    parts = {"whitebox", "transfer", "eps_sweep", "steps_sweep"}
    normal = _protocol(model, surrogate, x, y, parts)
    assert normal["flags"] == [], normal["flags"]
    res = _protocol(masked, surrogate, x, y, parts)
    fired = {f["flag"] for f in res["flags"]}
    assert {"transfer_beats_whitebox", "eps_sweep_does_not_fall"} <= fired, res
    # AutoAttack sees through it: its gradient-free Square breaks what the gradient attacks left
    # (at the digits test radius, where Square needs fewer queries: 20 images, ~12 s)
    res = _protocol(masked, surrogate, x[:20], y[:20], {"whitebox", "autoattack"}, eps=EPS)
    fired = {f["flag"] for f in res["flags"]}
    assert {"square_beats_gradient_attacks", "autoattack_warning"} <= fired, res
    assert res["autoattack"] < res["whitebox"]["PGD-100x3"] - 0.2


def test_the_apgd_part_is_a_quick_look_never_called_autoattack(runs, capsys):
    """`--parts apgd` (here through the Python API): APGD-CE then APGD-T at the standard counts,
    per stage in the JSON, titled APGD-CE+T; an eval.json from before the reference AutoAttack
    keeps its number under a title that says what it was."""
    res = iaat_eval.evaluate_run(runs[0], parts={"apgd"}, n_examples=20, name="apgd")
    assert list(res["apgd_stages"]) == ["APGD-CE", "APGD-T"] and "autoattack" not in res
    assert res["apgd"] == res["apgd_stages"]["APGD-T"] <= res["apgd_stages"]["APGD-CE"]
    assert res["apgd_details"]["settings"]["apgd-t"] == {"n_iter": 100, "n_restarts": 1,
                                                         "n_target_classes": 9}
    assert res["apgd_details"]["version"] == "standard stages only: apgd-ce, apgd-t"
    assert res["apgd_details"]["batch_size"] == 250  # AutoAttack's batch, not --batch-size
    out = capsys.readouterr().out
    assert "| APGD-CE | APGD-CE+T | worst case | flags |" in out and "AutoAttack |" not in out
    old = {"label": "old", "natural": 0.9, "autoattack": 0.5}
    assert "| AutoAttack (torchattacks, 10 iterations) |" in iaat_report.eval_table([old])


def test_images_all_broken_leave_later_stages_nothing_to_attack():
    """A model wrong on every image (and so on every one left after a stage) runs no attack
    batch at all, as the reference does, instead of failing on an empty one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(model[1].weight)
    with torch.no_grad():
        model[1].bias.copy_(torch.arange(10.0))  # always class 9
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    y = torch.zeros(6, dtype=torch.long)
    info = {}
    rows = iaat_autoattack.autoattack_correct(model, x, y, eps=0.1, info=info)
    assert rows.shape == (4, 6) and not rows.any()
    assert info["max_linf_255"] == 0.0  # nothing was attacked
