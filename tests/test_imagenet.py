"""imagenet/train.py on a tiny ImageFolder of real JPEG files: a 2-process gloo torchrun run
with autocast bf16 on CPU, SIGTERM and resume, the LR schedule, ImageNet-C mCE, bad input."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

import iaat_eval  # noqa: E402  (after conftest puts the repository on the path)

SCRIPT = ROOT / "imagenet" / "train.py"
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 8, 4
TINY = ["--arch", "resnet18", "--batch-size", "4", "--image-size", "32", "--resize", "36",
        "--device", "cpu", "--workers", "1", "--eval-steps", "3", "--eval-eps", "4", "8",
        "--print-every", "1", "--lr-warmup", "1", "--epochs", "2", "--warmup", "1",
        "--attack-steps", "3", "--select-steps", "2"]  # short attacks: these tests check the run, not PGD


def load_script():
    """imagenet/train.py as a module (it is a script, not a package)."""
    if "imagenet_train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("imagenet_train", SCRIPT)
        sys.modules["imagenet_train"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["imagenet_train"])
    return sys.modules["imagenet_train"]


def write_jpegs(folder, n, label, size=40, seed=0):
    """n JPEG files of class `label`: a class colour plus noise, so the classes are learnable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed * 1000 + label)
    colour = np.array([[255, 40, 40], [40, 255, 40], [40, 40, 255]])[label % 3]
    for i in range(n):
        pixels = np.clip(colour * 0.7 + rng.normal(0, 40, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i}.JPEG", quality=90)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for c in range(CLASSES):
        write_jpegs(root / "train" / f"n0000000{c}", TRAIN_PER_CLASS, c, seed=0)
        write_jpegs(root / "val" / f"n0000000{c}", VAL_PER_CLASS, c, seed=1)
    return root


def run(*args, torchrun=False, wait=True, timeout=600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"] if torchrun else [sys.executable]
    cmd = [*launcher, str(SCRIPT), *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two(imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    r = run("--data", imagenet, *TINY, "--amp", "bf16", "--out", out, torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_two_process_bf16_run_writes_checkpoint_metrics_and_evaluation(two):
    out, r = two
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 0)
    assert ckpt["config"]["amp"] == "bf16" and ckpt["config"]["model"] == "resnet18"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    # 24 images, 2 processes x 4: every image trained on once per epoch
    assert all(row["images"] == CLASSES * TRAIN_PER_CLASS for row in rows)
    assert all(row["images_per_second"] > 0 for row in rows)
    result = json.loads((out / "eval.json").read_text())
    assert result["images"] == CLASSES * VAL_PER_CLASS
    assert set(result["targeted_pgd"]) == {"4", "8"}
    assert all(0 <= v <= result["natural_top1"] for v in result["targeted_pgd"].values())


def test_eps_memory_is_one_memory_selected_once_per_image(two):
    out, _ = two
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    mem, visits = ckpt["eps_memory"], ckpt["eps_visits"]
    assert len(mem) == CLASSES * TRAIN_PER_CLASS
    assert (visits == 1).all()  # epoch 2 ran Alg 2 once per image, over both processes
    # Alg 2 from 16/255 by gamma 4/255 with beta 0.1: 16 +- 0.4, never below eps_min 4
    assert torch.allclose(mem * 255, torch.tensor(16.0), atol=0.41)
    assert (mem * 255 >= 4 - 1e-4).all() and not torch.allclose(mem * 255, torch.tensor(16.0))
    history = np.load(out / "eps_history.npy")  # float16 rows, one per epoch
    assert history.shape == (2, len(mem))
    assert (history[0] == np.float16(16 / 255)).all()  # the warmup epoch leaves the memory alone
    np.testing.assert_allclose(history[1], mem.numpy(), rtol=1e-3, atol=0)


def test_rank_zero_alone_logs_with_images_per_second(two):
    _, r = two
    lines = r.stdout.splitlines()
    assert sum(line.startswith("epoch 1 step 1/3 ") for line in lines) == 1
    assert sum("evaluation:" in line for line in lines) == 1
    assert any("img/s" in line for line in lines)
    assert "2 processes x 4" in r.stdout


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(imagenet, tmp_path):
    out = tmp_path / "run"
    args = ["--data", imagenet, *TINY, "--amp", "fp16", "--save-every", "1", "--epochs", "3",
            "--out", out]
    proc = run(*args, wait=False)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM: checkpoint saved" in stdout and "Traceback" not in stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    saved = (ckpt["epoch"], ckpt["step"])
    assert saved < (3, 0), "the signal came too late to test anything"
    assert ckpt["scaler"]["scale"] > 0  # the fp16 GradScaler travels with the checkpoint
    r = run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {out} at epoch {saved[0]} step {saved[1]}" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    # the interrupted epoch's row counts its images before and after the resume
    assert all(row["images"] == CLASSES * TRAIN_PER_CLASS for row in rows)
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    assert final["epoch"] == 3
    assert (final["eps_visits"] == 2).all()  # epochs 2 and 3 selected every image once


def test_learning_rate_warms_up_then_steps_down():
    m = load_script()
    c = m.ImageNetConfig(data="x", lr_warmup=5, lr_milestones=(35, 70, 95))
    assert m.peak_lr(c, world=64) == pytest.approx(0.1 * 32 * 64 / 256)  # Table 11: 0.8
    f = m.lr_factor(c, steps_per_epoch=10, world=64)  # global batch 2048
    # Goyal et al.: from 0.1 (the LR of a batch of 256, 1/8 of the peak) up to 0.8 in 5 epochs
    assert f(0) == pytest.approx(1 / 8) and f(25) == pytest.approx(1 / 8 + 7 / 8 / 2)
    assert f(50) == f(100) == 1.0
    assert f(349) == 1.0 and f(350) == pytest.approx(0.1) and f(700) == pytest.approx(0.01)
    assert f(950) == pytest.approx(0.001)
    small = m.lr_factor(c, steps_per_epoch=10, world=4)  # global batch 128: no warmup needed
    assert small(0) == small(49) == 1.0


def test_table_11_is_the_default_recipe():
    m = load_script()
    c = m.config_from_args(["--data", "x"])
    cfg = m.algorithm_config(c, world=64)
    assert (cfg.eps_w * 255, cfg.gamma * 255, cfg.beta, cfg.warmup) == pytest.approx((16, 4, 0.1, 30))
    assert (cfg.attack_steps, cfg.step_size * 255, cfg.eps_min * 255) == pytest.approx((30, 1, 4))
    assert cfg.select_steps == 10 and cfg.amp == "fp16"
    assert (c.epochs, c.lr_milestones, c.weight_decay, c.batch_size) == (110, (35, 70, 95), 1e-4, 32)
    assert c.eval_steps == 1000 and [e * 255 for e in c.eval_eps] == pytest.approx([4, 8, 12, 16])


def test_selection_uses_the_weaker_attack(monkeypatch):
    """Alg 2 runs PGD-10 (step 2/255) while the training attack is PGD-30 (step 1/255)."""
    import iaat
    m = load_script()
    cfg = m.algorithm_config(m.config_from_args(["--data", "x"]), world=1)
    seen = []
    real = iaat.pgd_fooled
    monkeypatch.setattr(iaat, "pgd_fooled", lambda *a, **k: seen.append(
        (k["steps"], k["step_size"])) or real(*a, **k))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,))
    mem = torch.full((8,), cfg.eps_w)
    iaat.choose_epsilon(model, x, y, torch.arange(8), mem, epoch=cfg.warmup, cfg=cfg)
    assert seen and all(s == 10 and step == pytest.approx(2 / 255) for s, step in seen)
    assert (mem >= 4 / 255 - 1e-7).all()


@pytest.fixture(scope="module")
def imagenet_c(tmp_path_factory):
    """ImageNet-C's layout (<corruption>/<severity>/<class>/), 2 JPEGs per class; every other
    corruption holds each class's images under the next class's label."""
    root = tmp_path_factory.mktemp("imagenet-c")
    swapped = list(iaat_eval.ALEXNET_ERR)[::2]
    for name in iaat_eval.ALEXNET_ERR:
        for severity in range(1, 6):
            for c in range(CLASSES):
                shown = (c + 1) % CLASSES if name in swapped else c
                write_jpegs(root / name / str(severity) / f"n0000000{c}", 2, shown, size=32,
                            seed=severity)
    return root, swapped


def test_mce_of_a_colour_classifier_is_exact(imagenet_c):
    """A model that names an image's strongest colour channel is right on every unswapped
    image and wrong on every swapped one: CE_c is 1 / AlexNet's error or 0."""
    root, swapped = imagenet_c
    m = load_script()
    c = m.ImageNetConfig(data="x", imagenet_c=str(root), image_size=32, workers=0)
    # behind a BatchNorm left in train mode: batch statistics would wash the colours out,
    # so the result is exact only if the evaluation runs in eval mode (identity statistics)
    colour = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.BatchNorm1d(3, affine=False)).train()
    mce, ce = m.corruption_errors(c, colour, torch.device("cpu"))
    assert colour.training and colour[2].running_mean.abs().max() == 0  # left as found
    want = {name: (1.0 if name in swapped else 0.0) / iaat_eval.ALEXNET_ERR[name]
            for name in iaat_eval.ALEXNET_ERR}
    assert ce == pytest.approx(want)
    assert mce == pytest.approx(np.mean(list(want.values())))


@pytest.mark.slow
def test_evaluate_only_adds_the_mce_column(two, imagenet, imagenet_c):
    out, _ = two
    r = run("--data", imagenet, "--out", out, "--evaluate-only", "--imagenet-c", imagenet_c[0],
            "--image-size", "32", "--resize", "36", "--eval-steps", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert set(result["ce"]) == set(iaat_eval.ALEXNET_ERR)
    assert result["mce"] == pytest.approx(np.mean(list(result["ce"].values())))
    assert result["epoch"] == 2 and result["pgd_steps"] == 2


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent"], "not found"),
    (["--data", "x", "--arch", "vgg16"], "invalid choice"),
    (["--data", "x", "--batch-size", "0"], "--batch-size must be positive"),
    (["--arch", "resnet18"], "--data is required"),
])
@pytest.mark.slow
def test_bad_input_is_one_line(args, message):
    r = run(*args, "--device", "cpu")
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_throughput_benchmark_reports_each_precision(tmp_path):
    path = tmp_path / "throughput.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "imagenet_throughput.py"),
                        "--quick", "--json", str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(path.read_text())
    assert set(result["images_per_second"]) == {"fp16", "none"}
    assert all(v > 0 for v in result["images_per_second"].values())
    assert result["fp16_speedup_over_fp32"] > 0 and "--quick" in result["command"]
    assert "| fp16 |" in r.stdout and "| fp32 |" in r.stdout


def test_sync_bn_converts_every_batchnorm():
    m = load_script()
    model = m.build_model("resnet18", 3, sync_bn=True)
    norms = [k for k in model.modules() if isinstance(k, torch.nn.modules.batchnorm._NormBase)]
    assert norms and all(isinstance(k, torch.nn.SyncBatchNorm) for k in norms)
    assert not any(isinstance(k, torch.nn.SyncBatchNorm) for k in m.build_model("resnet18", 3).modules())


@pytest.mark.slow
def test_sync_bn_on_cpu_processes_is_a_one_line_error(imagenet, tmp_path):
    r = run("--data", imagenet, *TINY, "--sync-bn", "--out", tmp_path / "run", torchrun=True)
    assert r.returncode != 0
    # each process's own error is one line (torchrun then adds its failure summary)
    assert "imagenet/train.py: error: --sync-bn needs GPUs" in r.stderr
    assert "ValueError" not in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_refused(two, imagenet):
    out, _ = two
    r = run("--data", imagenet, *TINY, "--amp", "bf16", "--epochs", "3", "--out", out)
    assert r.returncode == 1
    assert "written by 2 processes, this run has 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_weight_average_is_evaluated_into_its_own_file(imagenet, tmp_path, monkeypatch):
    """--ema: eval.json is the trained weights', eval_ema.json the checkpoint's average (the
    model the second evaluation sees holds exactly the saved average)."""
    out = tmp_path / "run"
    r = run("--data", imagenet, *TINY, "--ema", "0.5", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    raw, ema = (json.loads((out / name).read_text()) for name in ("eval.json", "eval_ema.json"))
    assert (raw["weights"], ema["weights"]) == ("raw", "ema")
    assert set(raw) == set(ema) and ema["epoch"] == 2 and ema["images"] == raw["images"]
    script, seen = load_script(), []
    monkeypatch.setattr(script, "evaluate", lambda c, model, device, log: seen.append(
        {k: v.clone() for k, v in model.state_dict().items()}) or {})
    c = script.config_from_args(["--data", str(imagenet), "--out", str(out), "--evaluate-only",
                                 "--device", "cpu"])
    script.evaluate_run(c, log=lambda msg: None)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(seen) == 2
    for state, key in zip(seen, ("model", "ema")):
        assert all(torch.equal(state[k], v) for k, v in ckpt[key].items())
    assert any(not torch.equal(v, ckpt["ema"][k]) for k, v in ckpt["model"].items())
