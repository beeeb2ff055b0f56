"""The evaluation suite (paper Sec 4, Tables 1-4, Figs 4 and 9): our attacks against
torchattacks', exactness of the shortcuts, the corruption layout, mCE, and `iaat eval`
end to end on digits models trained here."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import iaat
import iaat_eval
import iaat_report
import iaat_run
from conftest import ROOT, run_cli

EPS, STEP = 0.2, 0.05  # the digits preset's test radius and step


# the fixtures `runs` and `trained` (two short PGD-AT digits runs) are in conftest.py


def _acc(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_our_pgd_matches_torchattacks_pgd(trained):
    """Same model, same settings (PGD-20, step 0.05, random start, eval mode), same seed:
    within 1.5 points. (With one seed both draw the same random starts, so today they agree
    sample by sample; the seed-to-seed spread of either is about 1 point.)"""
    model, x, y = trained
    torch.manual_seed(1)
    ours = (_acc(model, iaat.pgd_attack(model, x, y, EPS, steps=20, step_size=STEP)) == y)
    torch.manual_seed(1)
    theirs = iaat_eval.library_correct(iaat_eval.library_attack("pgd", model, eps=EPS, step_size=STEP,
                                                      num_classes=10, steps=20), model, x, y, EPS)
    clean = (_acc(model, x) == y).float().mean().item()
    ours, theirs = ours.float().mean().item(), theirs.float().mean().item()
    assert 0.1 < ours < clean - 0.1, "the model should be partly robust for a meaningful check"
    assert abs(ours - theirs) <= 0.015, (ours, theirs)


def test_any_iterate_and_restarts_are_at_least_as_strong(trained):
    """attack_correct counts a sample broken at its first misclassified iterate, so with the
    same random start it breaks every sample the last iterate breaks, and more restarts only
    break more: per sample, not just on average."""
    model, x, y = trained
    torch.manual_seed(3)
    one = iaat_eval.attack_correct(model, x, y, eps=EPS, steps=10, step_size=STEP)
    torch.manual_seed(3)
    three = iaat_eval.attack_correct(model, x, y, eps=EPS, steps=10, step_size=STEP, restarts=3)
    clean = _acc(model, x) == y
    torch.manual_seed(3)
    alive = clean.nonzero().flatten()  # attack_correct draws the starts of these samples only
    last = clean.clone()
    last[alive] = _acc(model, iaat.pgd_attack(model, x[alive], y[alive], EPS, steps=10,
                                              step_size=STEP)) == y[alive]
    assert not (one & ~last).any() and not (three & ~one).any()
    assert three.sum() < one.sum() <= last.sum() < clean.sum()


def test_steps_sweep_equals_separate_pgd_runs(trained):
    """One run of max(steps) gives exactly PGD-k for every k (fixed step, same random start)."""
    model, x, y = trained
    ks = (7, 1, 15, 3)  # rows come back in the order asked
    torch.manual_seed(5)
    sweep = iaat_eval.pgd_steps_sweep(model, x, y, eps=EPS, step_size=STEP, steps=ks)
    for row, k in zip(sweep, ks):
        torch.manual_seed(5)
        assert torch.equal(row, iaat_eval.attack_correct(model, x, y, eps=EPS, steps=k,
                                                    step_size=STEP)), k
    assert sweep[1].sum() > sweep[2].sum()  # PGD-1 is weaker than PGD-15


def test_transfer_from_the_model_itself_is_its_white_box_attack(trained, runs):
    model, x, y = trained
    torch.manual_seed(7)
    self_transfer = iaat_eval.transfer_correct(model, model, x, y, eps=EPS, steps=10, step_size=STEP)
    torch.manual_seed(7)
    white = _acc(model, iaat.pgd_attack(model, x, y, EPS, steps=10, step_size=STEP)) == y
    assert torch.equal(self_transfer, white)
    surrogate = iaat_eval.load_run(runs[1], torch.device("cpu"))[0]
    other = iaat_eval.transfer_correct(model, surrogate, x, y, eps=EPS, steps=10, step_size=STEP)
    assert other.float().mean() > white.float().mean()  # a black-box attack is weaker here


def test_random_targets_are_other_classes_and_seeded():
    y = torch.arange(10).repeat(200)
    t = iaat_eval.random_targets(y, 10, torch.Generator().manual_seed(0))
    assert not (t == y).any() and set(t.tolist()) == set(range(10))
    assert torch.equal(t, iaat_eval.random_targets(y, 10, torch.Generator().manual_seed(0)))
    assert not torch.equal(t, iaat_eval.random_targets(y, 10, torch.Generator().manual_seed(1)))


def test_random_targeted_attack_moves_images_to_their_targets(trained):
    model, x, y = trained
    target = iaat_eval.random_targets(y, 10, torch.Generator().manual_seed(0))
    x_adv = iaat.pgd_attack(model, x, target, 0.4, steps=20, step_size=0.05, targeted=True)
    hit = (_acc(model, x_adv) == target).float().mean()
    assert hit > 0.5
    torch.manual_seed(2)
    one = iaat_eval.attack_correct(model, x, y, eps=EPS, steps=20, step_size=STEP, target=target)
    torch.manual_seed(2)
    three = iaat_eval.attack_correct(model, x, y, eps=EPS, steps=20, step_size=STEP, target=target,
                                restarts=3)
    untargeted = iaat_eval.attack_correct(model, x, y, eps=EPS, steps=20, step_size=STEP)
    assert not (three & ~one).any() and three.sum() < one.sum()  # each sample's worst restart
    # reaching one given class is harder than leaving the true one
    assert one.float().mean() >= untargeted.float().mean() - 0.01


def test_library_attacks_stay_in_the_ball_and_below_natural(trained):
    model, x, y = trained
    x, y = x[:60], y[:60]
    natural = (_acc(model, x) == y).float().mean()
    torch.manual_seed(0)
    pgd40 = iaat_eval.attack_correct(model, x, y, eps=EPS, steps=40, step_size=STEP).float().mean()
    accs = {}
    for name in ("deepfool", "mifgsm", "cw40"):
        attack = iaat_eval.library_attack(name, model, eps=EPS, step_size=STEP, num_classes=10)
        if name != "deepfool":  # DeepFool is unbounded (L2); library_correct clips it
            x_adv = attack(x, y)
            assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() <= x_adv.max() <= 1
        accs[name] = iaat_eval.library_correct(attack, model, x, y, EPS).float().mean()
        assert accs[name] <= natural, name
    assert accs["mifgsm"] < natural and accs["deepfool"] < natural
    assert abs(accs["cw40"] - pgd40) <= 0.1  # CW-loss PGD-40 is about as strong as CE PGD-40


def test_cw_margin_by_hand():
    logits = torch.tensor([[2.0, 5.0, -1.0], [0.5, 0.0, 3.0]])
    y = torch.tensor([1, 0])
    assert iaat_eval.cw_margin(logits, y).item() == pytest.approx((2.0 - 5.0) + (3.0 - 0.5))
    assert iaat_eval.cw_margin(logits, y, reduction="none").tolist() == [2.0 - 5.0, 3.0 - 0.5]


def test_eval_subset_is_fixed_by_seed():
    a = iaat_eval.test_subset(1000, 100, seed=3, device="cpu")
    assert torch.equal(a, iaat_eval.test_subset(1000, 100, seed=3, device="cpu"))
    assert len(set(a.tolist())) == 100 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, iaat_eval.test_subset(1000, 100, seed=4, device="cpu"))
    assert torch.equal(iaat_eval.test_subset(50, None, seed=0, device="cpu"), torch.arange(50))


# ---------------------------------------------------------------- corruptions and mCE

def write_corruptions(root, images_nhwc, labels, names=iaat_eval.CORRUPTIONS, make=None):
    """Files in the published CIFAR-10-C layout: <name>.npy (5n, H, W, C) uint8, severities
    1-5 stacked in order, and labels.npy (5n,)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        stack = np.concatenate([make(images_nhwc, i, s) if make else images_nhwc
                                for s in range(5)])
        np.save(root / f"{name}.npy", stack.astype(np.uint8))
    np.save(root / "labels.npy", np.tile(np.asarray(labels, dtype=np.uint8), 5))


def test_corruption_loader_reads_the_published_layout(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_corruptions(tmp_path, imgs, [3, 1, 4, 1], names=["fog"],
                      make=lambda im, i, s: np.clip(im.astype(int) + 10 * s, 0, 255))
    x, y = iaat_eval.load_corruption(tmp_path, "fog")
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32)
    assert y.tolist() == [3, 1, 4, 1] * 5
    raw = np.load(tmp_path / "fog.npy")
    assert x[13, 2, 5, 7].item() == raw[13, 5, 7, 2]  # NHWC -> NCHW, rows kept in order
    assert torch.equal(x[8:12].permute(0, 2, 3, 1), torch.from_numpy(raw[8:12]))  # severity 3


@pytest.mark.parametrize("damage,message", [
    ("missing", "fog.npy not found"),
    ("dtype", "expected uint8 (5n, H, W, C)"),
    ("labels", "expected uint8 (5n, H, W, C)"),
    ("2-d labels", "expected uint8 (5n, H, W, C)"),
    ("empty", "cannot read"),
])
def test_corruption_loader_rejects_bad_files(tmp_path, damage, message):
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    write_corruptions(tmp_path, imgs, [0, 1], names=["fog"])
    if damage == "missing":
        (tmp_path / "fog.npy").unlink()
    elif damage == "dtype":
        np.save(tmp_path / "fog.npy", np.zeros((10, 8, 8, 3), np.float32))
    elif damage == "labels":
        np.save(tmp_path / "labels.npy", np.zeros(7, np.uint8))
    elif damage == "2-d labels":
        np.save(tmp_path / "labels.npy", np.zeros((10, 1), np.uint8))
    else:
        (tmp_path / "fog.npy").write_bytes(b"")
    with pytest.raises(iaat_run.IAATError, match=message.replace("(", r"\(").replace(")", r"\)")):
        iaat_eval.load_corruption(tmp_path, "fog")


def test_mce_against_alexnet():
    alex = {c: [e] * 5 for c, e in iaat_eval.ALEXNET_ERR.items()}
    assert iaat_eval.mean_corruption_error(alex)[0] == pytest.approx(1.0)
    half = {c: [e / 2 - 0.1, e / 2, e / 2 + 0.1, e / 2, e / 2] for c, e in iaat_eval.ALEXNET_ERR.items()}
    mce, ce = iaat_eval.mean_corruption_error(half)
    assert mce == pytest.approx(0.5) and ce["fog"] == pytest.approx(0.5)
    assert len(ce) == 15 and "saturate" not in ce  # the 4 extra CIFAR-C corruptions are not in mCE
    del half["snow"]
    with pytest.raises(iaat_run.IAATError, match="missing snow"):
        iaat_eval.mean_corruption_error(half)


# ---------------------------------------------------------------- the CLI, end to end

QUICK = ["--whitebox", "5x2,10x2,20x1", "--transfer", "20x1", "--eps-sweep", "0,12.75,25.5,51,76.5",
         "--sweep-attack", "10x1", "--steps-sweep", "1,5,20", "--n-examples", "40"]


def test_eval_cli_runs_the_whole_protocol(runs, tmp_path):
    run, surrogate = runs
    model, cfg, data, _ = iaat_eval.load_run(run, torch.device("cpu"))
    idx = iaat_eval.test_subset(len(data.test_y), 40, seed=0, device="cpu")
    # every corruption the clean images, except that severity 5 of each is all black
    imgs = data.test_x[idx].permute(0, 2, 3, 1).numpy()
    write_corruptions(tmp_path / "digits-c", imgs, data.test_y[idx].numpy(),
                      make=lambda im, i, s: im * (s < 4))
    r = run_cli("eval", run, "--surrogate", surrogate, "--corruptions", tmp_path / "digits-c",
                *QUICK, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((run / "eval.json").read_text())
    assert res["n_examples"] == 40 and res["eps_255"] == 51 and res["surrogate"] == str(surrogate)
    assert res["complete"] is True
    assert set(res["whitebox"]) == {"PGD-5x2", "PGD-10x2", "PGD-20x1"}
    for key in ("natural", "transfer", "deepfool", "mifgsm", "cw40", "autoattack", "worst_case"):
        assert 0 <= res[key] <= 1, key
    assert res["autoattack"] <= res["whitebox"]["PGD-20x1"]  # on the same 40 examples
    # the reference's standard AutoAttack, with its robust accuracy after each of its attacks
    assert list(res["autoattack_stages"]) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert res["autoattack_stages"]["Square"] == res["autoattack"] and "apgd" not in res
    assert res["autoattack_details"]["settings"]["apgd-ce"]["n_iter"] == 100
    assert isinstance(res["flags"], list)
    assert res["worst_case"] <= min(list(res["whitebox"].values()) +
                                    [res[k] for k in ("deepfool", "mifgsm", "cw40", "autoattack")])
    # corruption accuracy: severities 1-4 are the clean images, severity 5 is black
    clean = (_acc(model, iaat.to_float(data.test_x[idx])) == data.test_y[idx]).float().mean()
    black = (_acc(model, torch.zeros(40, 1, 8, 8)) == data.test_y[idx]).float().mean()
    assert res["natural"] == pytest.approx(clean.item())
    per = res["corruptions"]["per_corruption"]
    assert len(per) == 19 and per["fog"] == pytest.approx([clean.item()] * 4 + [black.item()])
    assert res["corruptions"]["mean"] == pytest.approx((4 * clean.item() + black.item()) / 5)
    # sweeps: eps 0 is the natural accuracy, and accuracy does not rise with eps or steps
    eps_acc = res["eps_sweep"]["acc"]
    assert eps_acc[0] == pytest.approx(res["natural"])
    assert all(b <= a + 1 / 40 for a, b in zip(eps_acc, eps_acc[1:])) and eps_acc[-1] < eps_acc[0]
    steps_acc = res["steps_sweep"]["acc"]
    assert steps_acc == sorted(steps_acc, reverse=True)
    table = (run / "eval.md").read_text()
    assert "| run | natural | PGD-5x2 | PGD-10x2 | PGD-20x1 | transfer | corruption |" in table
    assert ("| AA after APGD-CE | AA after APGD-T | AA after FAB-T | AutoAttack | worst case | "
            "flags |") in table and "Sanity flags" in table
    assert table.splitlines()[0] in r.stdout
    for png in ("eval_eps_sweep.png", "eval_steps_sweep.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # scripts/eval_table.py: mean ± std over seeds (here the same result twice, as seeds 0, 1)
    twin = tmp_path / "twin.json"
    twin.write_text(json.dumps(dict(res, seed=1)))
    r = subprocess.run([sys.executable, ROOT / "scripts" / "eval_table.py", run / "eval.json", twin,
                        "--plot", tmp_path / "sweeps.png"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = r.stdout.strip().splitlines()[-1]
    assert row.startswith("| digits smallcnn at | 0,1 | ")
    assert f"{100 * res['natural']:.1f} ± 0.0" in row and len(row.split("|")) - 2 == 16  # cells
    assert (tmp_path / "sweeps.png").stat().st_size > 10_000


def test_eval_eps_sweep_does_not_rise_on_the_whole_test_set(trained):
    """Robust accuracy over test eps (paper Fig 4), 497 images: non-increasing within the noise
    of one sample, and exactly the natural accuracy at eps 0."""
    model, x, y = trained
    ev = dict(iaat_eval.EVAL_PRESETS["digits"], parts={"eps_sweep"}, targeted="none", n_examples=None,
              seed=0, batch_size=500, sweep_attack=(20, 1))
    res = iaat_eval.run_evaluation(model, (x * 255).round().to(torch.uint8), y, ev=ev, num_classes=10)
    acc = res["eps_sweep"]["acc"]
    assert acc[0] == res["natural"]
    assert all(b <= a + 1 / len(y) for a, b in zip(acc, acc[1:])), acc
    assert acc[-1] < 0.5 * acc[0]


def _one_line_error(r, fragment, code=1):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("iaat: error:") and fragment in lines[0], lines[0]


@pytest.mark.slow
def test_eval_cli_errors(runs, tmp_path):
    run, surrogate = runs
    _one_line_error(run_cli("eval", tmp_path / "nothing"), "checkpoint.pt not found")
    _one_line_error(run_cli("eval", run, "--parts", "transfer"), "needs --surrogate")
    _one_line_error(run_cli("eval", run, "--parts", "whitebox,lasers"), "unknown --parts lasers")
    _one_line_error(run_cli("eval", run, "--surrogate", run, "--parts", "transfer"),
                    "must be another run")
    _one_line_error(run_cli("eval", run, "--whitebox", "10y5"), "STEPSxRESTARTS", code=2)
    _one_line_error(run_cli("eval", run, "--eps", "-8"), "a number >= 0", code=2)
    _one_line_error(run_cli("eval", run, "--eps", "8,16"), "a number >= 0", code=2)
    _one_line_error(run_cli("eval", run, "--transfer", "10x1,20x2"), "one STEPSxRESTARTS", code=2)
    _one_line_error(run_cli("eval", run, "--steps-sweep", "0,10"), "numbers >= 1", code=2)
    _one_line_error(run_cli("eval", run, "--n-examples", "0"), "must be positive")
    _one_line_error(run_cli("eval", run, "--corruptions", tmp_path, "--parts", "corruptions"),
                    "gaussian_noise.npy not found")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _one_line_error(run_cli("eval", bad), "is unreadable")
    assert not list(run.glob(".*.tmp*"))  # no half-written files left behind


def test_evaluation_runs_in_eval_mode_and_fp32(trained):
    """A model handed over in train mode (and inside autocast) is evaluated in eval mode and
    FP32: BatchNorm statistics do not move, the mode is given back, and the numbers equal
    those of the same call on the model in eval mode."""
    model, x, y = trained
    x_u8 = (x[:50] * 255).round().to(torch.uint8)
    ev = dict(iaat_eval.EVAL_PRESETS["digits"], parts={"whitebox", "steps_sweep"}, targeted="none",
              n_examples=None, seed=0, batch_size=20, whitebox=((5, 2),), steps_sweep=(1, 5))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes = set()
    hook = model.register_forward_hook(lambda m, inp, out: dtypes.add(out.dtype))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_train = iaat_eval.run_evaluation(model, x_u8, y[:50], ev=ev, num_classes=10)
    hook.remove()
    assert dtypes == {torch.float32} and model.training
    model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    in_eval = iaat_eval.run_evaluation(model, x_u8, y[:50], ev=ev, num_classes=10)
    for key in ("natural", "whitebox", "steps_sweep"):
        assert in_train[key] == in_eval[key], key


@pytest.mark.slow
def test_eval_cli_random_targeted_and_a_100_class_corruption_set(runs, tmp_path):
    run = runs[0]
    r = run_cli("eval", run, "--parts", "whitebox", "--whitebox", "5x2", "--targeted", "random",
                "--n-examples", "30", "--batch-size", "7", "--name", "targeted")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((run / "targeted.json").read_text())
    assert res["targeted"] == "random" and res["complete"] and res["n_examples"] == 30
    assert res["whitebox"]["PGD-5x2"] <= res["natural"]
    write_corruptions(tmp_path / "c100", np.zeros((2, 8, 8, 1), np.uint8), [50, 99])
    _one_line_error(run_cli("eval", run, "--parts", "corruptions", "--corruptions",
                            tmp_path / "c100"), "the model has 10 classes")


def test_the_python_api_gives_what_the_cli_gives(runs, capsys):
    """iaat_eval.evaluate_run with keyword arguments (radii in [0,1]) is `iaat eval` with flags
    (radii in /255): the same numbers, written under its own name, printed as a table."""
    run, _ = runs
    api = iaat_eval.evaluate_run(run, parts={"whitebox", "eps_sweep"}, whitebox=[(5, 2)],
                                 eps_sweep=(0.0, 0.1, 0.2), sweep_attack=(5, 1), n_examples=40,
                                 eps=0.2, name="api")
    assert "| run | natural | PGD-5x2 |" in capsys.readouterr().out
    r = run_cli("eval", run, "--parts", "whitebox,eps_sweep", "--whitebox", "5x2", "--eps-sweep",
                "0,25.5,51", "--sweep-attack", "5x1", "--n-examples", "40", "--eps", "51",
                "--name", "cli")
    assert r.returncode == 0, r.stderr[-2000:]
    cli = json.loads((run / "cli.json").read_text())
    assert json.loads((run / "api.json").read_text())["whitebox"] == api["whitebox"]
    assert api["whitebox"] == cli["whitebox"] and api["natural"] == cli["natural"]
    assert api["eps_sweep"]["acc"] == cli["eps_sweep"]["acc"]
    assert api["eps_sweep"]["eps_255"] == pytest.approx(cli["eps_sweep"]["eps_255"])
    with pytest.raises(iaat_run.IAATError, match="unknown --parts lasers"):
        iaat_eval.evaluate_run(run, parts={"lasers"})


class WrongOnlyClean(nn.Module):
    """Wrong (class 1) on the clean gray image 128/255, right (class 0) on any image that differs
    from it by more than 1e-3, with a gradient that every attack follows (the sum of pixels
    raises class 0). An attack cannot make it robust: it is wrong on the clean image."""
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # the attack libraries read the device here

    def forward(self, x):
        moved = ((x - 128 / 255).abs().flatten(1).amax(1) > 1e-3).float()
        class0 = 10 * moved + 0.01 * x.flatten(1).sum(1)
        return torch.stack([class0, torch.full_like(class0, 5.0)] + [class0 - 20] * 8, 1)


def test_an_image_wrong_clean_is_robust_in_no_column():
    """Robust accuracy is correct on the clean image and on the attacked one, in every column:
    the attacked images of transfer, MI-FGSM and CW40 are classified correctly here, yet the
    image counts as broken, as it does under PGD and AutoAttack."""
    model = WrongOnlyClean().eval()
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()  # any gradient will do
    x, y = torch.full((2, 1, 8, 8), 128, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        xf = x.float() / 255
        assert (model(xf).argmax(1) == 1).all()  # wrong clean
        moved = iaat.pgd_attack(surrogate, xf, y, 0.2, steps=3, step_size=0.05)
        assert (model(moved).argmax(1) == 0).all()  # right once moved: the case that matters
    ev = dict(iaat_eval.EVAL_PRESETS["digits"], targeted="none", n_examples=None, seed=0,
              batch_size=500, autoattack_batch_size=250, whitebox=((5, 1),), transfer=(5, 1),
              sweep_attack=(5, 1), eps_sweep=(0.0, 0.2), steps_sweep=(1, 5),
              parts={"whitebox", "transfer", "eps_sweep", "steps_sweep", "apgd", "autoattack",
                     *iaat_eval.LIBRARY_ATTACKS})
    res = iaat_eval.run_evaluation(model, x, y, ev=ev, num_classes=10, surrogate=surrogate)
    cells = iaat_report.table_cells(res)
    assert len(cells) >= 12 and all(v == 0 for v in cells.values()), cells
    assert res["eps_sweep"]["acc"] == [0, 0] and res["steps_sweep"]["acc"] == [0, 0]
    # each attack alone says so too
    for name in iaat_eval.LIBRARY_ATTACKS:
        attack = iaat_eval.library_attack(name, model, eps=0.2, step_size=0.05, num_classes=10)
        assert not iaat_eval.library_correct(attack, model, xf, y, 0.2).any(), name
    assert not iaat_eval.transfer_correct(model, surrogate, xf, y, eps=0.2, steps=3,
                                          step_size=0.05).any()


def test_autoattack_batch_is_the_references_unless_given():
    assert iaat_eval.eval_settings("digits")["autoattack_batch_size"] == 250
    assert iaat_eval.eval_settings("digits", autoattack_batch_size=64)["autoattack_batch_size"] == 64
    with pytest.raises(iaat_run.IAATError, match="autoattack-batch-size must be positive"):
        iaat_eval.eval_settings("digits", autoattack_batch_size=0)
    args = iaat_eval.build_eval_parser().parse_args(["RUN", "--autoattack-batch-size", "100"])
    assert args.autoattack_batch_size == 100 and args.batch_size == 500


def test_the_training_evaluation_counts_robust_only_if_correct_clean():
    """iaat.evaluate (the per-epoch check and the final PGD-20) uses the same definition."""
    model = WrongOnlyClean().eval()
    x, y = torch.full((2, 1, 8, 8), 128, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
    acc = iaat.evaluate(model, x, y, eps=0.2, steps=3, step_size=0.05)
    assert acc == {"clean": 0.0, "robust": 0.0}
    ok = iaat.evaluate(model, x, torch.ones(2, dtype=torch.long), eps=0.0, steps=1, step_size=0.05)
    assert ok == {"clean": 1.0, "robust": 1.0}  # right clean, and eps 0 changes nothing
