"""iaat_radius: the minimal adversarial radius against a linear model's exact L-inf distance to
its decision boundary inside [0,1]; label flips; the radius ranking and `iaat rank`'s CSV."""
import csv

import numpy as np
import pytest
import torch

import iaat
import iaat_eval
import iaat_radius
import iaat_run
from conftest import ROOT, distance_to_boundary, frozen_linear, run_cli

D = 24


def linear_problem(n=400, seed=0):
    """A frozen 2-class linear model on [0,1]^D and inputs near the box's faces, where the
    box, not the eps-ball, limits how far many coordinates can move."""
    g = torch.Generator().manual_seed(seed)
    model = frozen_linear(D, g)
    near = 0.06 * torch.rand(n, D, generator=g)
    x = torch.where(torch.rand(n, D, generator=g) < 0.5, near, 1 - near).view(n, 1, 4, D // 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def exact_distance(model, x, y):
    """The exact distance inside the box [0,1] (conftest.distance_to_boundary), and the
    distance without the box, margin / |w_y - w_other|_1."""
    w = model[1].weight.double()
    v = w[y] - w[1 - y]
    free = (x.flatten(1).double() * v).sum(1) / v.abs().sum(1)  # the bias is 0
    return distance_to_boundary(model, x, y).double().numpy(), free.numpy()


def test_minimal_radius_is_the_distance_to_the_boundary_inside_the_box():
    model, x, y = linear_problem()
    d, free = exact_distance(model, x, y)
    pick = (d > 0.02) & (d < 0.45)
    assert pick.sum() >= 60
    tol = 1 / 255
    r = iaat_radius.minimal_radius(model, x[pick], y[pick], eps_max=0.5, tol=tol).double().numpy()
    # PGD found another class at r, so r is at least the exact distance; bisection stops within
    # tol of it (PGD's sign steps are exact on a linear model).
    assert (r >= d[pick] - 1e-5).all() and (r <= d[pick] + tol + 1e-5).all()
    # The box matters here: the distance without it is further off than the tolerance.
    clamp_matters = d[pick] - free[pick] > 3 * tol
    assert clamp_matters.sum() >= 30
    assert (np.abs(r - free[pick])[clamp_matters] > 2 * tol).all()


def test_minimal_radius_zero_when_misclassified_inf_when_never_fooled():
    model, x, y = linear_problem(n=200, seed=1)
    d, _ = exact_distance(model, x, y)
    far, near = int(np.argmax(d)), int(np.argmin(d))
    assert d[far] > 0.2 and d[near] < 0.1
    xs, ys = x[[far, near, near]], y[[far, near, near]].clone()
    ys[2] = 1 - ys[2]  # a wrong label: misclassified clean
    r = iaat_radius.minimal_radius(model, xs, ys, eps_max=0.15, tol=0.01)
    assert r[0] == float("inf") and 0 < r[1] <= 0.15 and r[2] == 0


class Shell(torch.nn.Module):
    """Class 1 exactly where the largest pixel change from the gray image 0.5 lies in
    [0.2, 0.3), class 0 elsewhere, with zero input gradient: PGD's iterates stay at its random
    start, whose largest change is almost the radius. So PGD fools the gray image at radii
    just above 0.2 and not at 0.5: a case where the run at eps_max fails and the bisection
    finds a fooling radius."""
    def forward(self, x):
        change = (x - 0.5).abs().flatten(1).amax(1)
        shell = ((change >= 0.2) & (change < 0.3)).float()
        return torch.stack([torch.zeros_like(change), 2 * shell - 1], 1) + 0 * change[:, None]


def test_minimal_radius_keeps_a_fooling_radius_the_run_at_eps_max_missed():
    torch.manual_seed(0)
    x, y = torch.full((4, 1, 8, 8), 0.5), torch.zeros(4, dtype=torch.long)
    model = Shell()
    assert iaat_eval.attack_correct(model, x, y, eps=0.5, steps=20, restarts=3,
                                    step_size=0.125).all()  # never fooled at eps_max
    r = iaat_radius.minimal_radius(model, x, y, eps_max=0.5, tol=0.01)
    assert torch.isfinite(r).all() and ((r >= 0.2) & (r <= 0.3)).all(), r


def test_flip_labels_flips_exactly_the_fraction_to_other_classes():
    y = torch.arange(1000) % 10
    a = iaat_radius.flip_labels(y, 10, 0.05, seed=3)
    assert torch.equal(a, iaat_radius.flip_labels(y, 10, 0.05, seed=3))
    assert (a != y).sum() == 50 and a.min() >= 0 and a.max() <= 9
    assert not torch.equal(a, iaat_radius.flip_labels(y, 10, 0.05, seed=4))
    assert torch.equal(iaat_radius.flip_labels(y, 10, 0.0, seed=3), y)


def test_suspicion_scores():
    flagged = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    radius = np.array([0.1, 0.5, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0])
    s = iaat_radius.suspicion_scores(radius, flagged, top=0.2)  # the 2 smallest: images 0 and 2
    assert s["precision"] == 0.5 and s["auroc"] == pytest.approx((8 + 5) / 16) and s["tied"] == 1


def test_suspicion_precision_takes_ties_in_random_order():
    """Five images tied at the smallest score, one of them flagged (the lowest index): the top
    2 hold 2 * 1/5 flagged images on average, whatever the order of the indices."""
    flagged = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
    radius = np.array([0.1] * 5 + [0.2, 0.3, 0.4, 0.5, 0.6])
    s = iaat_radius.suspicion_scores(radius, flagged, top=0.2)
    assert s["precision"] == pytest.approx(1 / 5) and s["tied"] == 5
    # one image strictly below the tie: it counts fully, one of the four tied ones comes with it
    radius[9] = 0.05
    s = iaat_radius.suspicion_scores(radius, flagged, top=0.2)
    assert s["precision"] == pytest.approx((1 + 1 / 5) / 2) and s["tied"] == 5
    # float rounding does not break a tie (radii reached by other orders of the same steps)
    radius[1:5] += 1e-9
    assert iaat_radius.suspicion_scores(radius, flagged, top=0.2)["tied"] == 5


QUICK = ["--epochs", "2", "--warmup", "1", "--n-train", "200", "--eval-subset", "20",
         "--eval-steps", "2"]


def test_rank_writes_the_runs_images_sorted_by_radius(tmp_path):
    run = tmp_path / "run"
    r = run_cli(*QUICK, "--label-noise", "0.1", "--out", run)
    assert r.returncode == 0, r.stderr
    r = run_cli("rank", run)
    assert r.returncode == 0, r.stderr
    with open(run / "radius_ranking.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "label", "radius_255"] and len(rows) == 201
    index = [int(row[0]) for row in rows[1:]]
    radius = [float(row[2]) for row in rows[1:]]
    assert sorted(index) == list(range(200))
    assert radius == sorted(radius) and radius[0] < radius[-1]  # one epoch of Alg 2 spreads them
    mem = torch.load(run / "checkpoint.pt", weights_only=True)["eps_memory"].double().numpy()
    assert np.allclose(radius, mem[index] * 255, atol=1e-4)
    # the labels the run trained with: 10% flipped, drawn with --seed
    clean = iaat.load_digits().train_y[:200]
    noisy = iaat_radius.flip_labels(clean, 10, 0.1, seed=0)
    assert [int(row[1]) for row in rows[1:]] == noisy[index].tolist()
    assert (noisy != clean).sum() == 20
    # the Python API gives the same order; --out writes elsewhere
    ranking = iaat_radius.rank_by_radius(run)
    assert ranking["index"].tolist() == index
    r = run_cli("rank", run, "--out", tmp_path / "r.csv")
    assert r.returncode == 0 and (tmp_path / "r.csv").read_text() == \
        (run / "radius_ranking.csv").read_text()


@pytest.mark.slow
def test_rank_bad_run_folder_is_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        r = run_cli("rank", folder, "--out", tmp_path / "x.csv")
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("iaat: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "checkpoint.pt not found" in r.stderr
    # a PGD-AT run has no radius per image
    run = tmp_path / "at"
    assert run_cli("--epochs", "1", "--n-train", "64", "--eval-subset", "0", "--eval-steps", "1",
                   "--method", "at", "--out", run).returncode == 0
    r = run_cli("rank", run)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--method at" in r.stderr
    assert not (tmp_path / "x.csv").exists() and not (run / "radius_ranking.csv").exists()
    assert list(tmp_path.glob("**/.*.tmp*")) == []


def test_label_noise_out_of_range_is_an_error():
    with pytest.raises(iaat_run.IAATError, match="label-noise"):
        iaat.make_config("digits", label_noise=1.0)


def test_radius_bound_script_compares_attacks_on_one_bisection(runs, capsys):
    """scripts/radius_bound.py: the same images and bisection for each attack; the first row is
    the reference (no drop against itself); a bad attack list or run folder is an error."""
    import runpy
    script = runpy.run_path(str(ROOT / "scripts" / "radius_bound.py"), run_name="radius_bound")
    assert script["main"]([str(runs[0]), "--n", "24", "--attacks", "5x1,20x3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| PGD-")]
    assert [r.split(" | ")[0] for r in rows] == ["| PGD-5x1", "| PGD-20x3"], out
    assert rows[0].split(" | ")[3:7] == ["0.0%", "0.0%", "0.00", "0.00"]
    assert "24 training images" in out
    with pytest.raises(SystemExit) as exit_:
        script["main"]([str(runs[0]), "--attacks", "20y3"])
    assert exit_.value.code == 2
    assert script["main"]([str(runs[0]) + "-missing"]) == 1
    assert "radius_bound: error:" in capsys.readouterr().err
