"""`iaat export` and RobustBench's formats (docs/robustbench.md): an exported model loads with
RobustBench's own loading code and gives the project's logits; the model_info JSON has the
fields and formats of RobustBench's model_info files and the run's AutoAttack number; a bad
run folder or a missing evaluation is a one-line error and leaves nothing half written."""
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import types

import pytest
import torch

from conftest import write_fake_cifar
import iaat
import iaat_eval
import iaat_export
import iaat_report

# the fields every model_info/cifar10/Linf/*.json of RobustBench has
LINF_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
               "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc"}


def import_robustbench():
    """robustbench 1.1.1 as published on PyPI, imported with its own code unchanged. Two names
    it imports come from none of its declared dependencies; where they are missing, they are
    supplied first: `autoattack` (in its eval module: the reference AutoAttack, which it
    declares as pyautoattack, the same code under its PyPI name) and `pkg_resources` (gone from
    recent setuptools; its ImageNet loader finds a file of its own with it)."""
    if importlib.util.find_spec("autoattack") is None:
        import pyautoattack
        import pyautoattack.state
        sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda module, name: os.path.join(
            os.path.dirname(sys.modules[module].__file__), name)
        sys.modules["pkg_resources"] = shim
    import robustbench.utils
    return robustbench


@pytest.fixture(scope="module")
def robustbench():
    return import_robustbench()


def random_run(folder, dataset: str, model: str, epoch: int = 3, **settings):
    """A run folder whose checkpoint holds `model` at `epoch` with random weights, BatchNorm
    statistics and input normalisation: every number of the state reaches the logits."""
    channels, classes = iaat_eval.DATASET_SHAPES[dataset]
    cfg = iaat.make_config(dataset, model, epochs=3, out=str(folder), **settings)
    g = torch.Generator().manual_seed(1)
    net = iaat.build_model(model, classes, (0.5,) * channels, (0.25,) * channels)
    with torch.no_grad():  # convolutions and linear layers are random from their init already
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.add_(0.1 * torch.randn(t.shape, generator=g))
                m.running_var.mul_(1 + torch.rand(m.running_var.shape, generator=g))
        net[0].mean.add_(0.2 * torch.rand(net[0].mean.shape, generator=g))
        net[0].std.mul_(1 + torch.rand(net[0].std.shape, generator=g))
    s = iaat.make_state(net, cfg, n=1)
    s.epoch = epoch
    folder.mkdir(parents=True, exist_ok=True)
    iaat.save_checkpoint(folder / "checkpoint.pt", cfg, s, {})
    return folder


def quick_eval(run, tmp_path, **kw):
    """`iaat eval`'s PGD-1x1 on a few test images (CIFAR from files in CIFAR's format)."""
    data = {}
    if iaat_eval.run_config(run)[0].dataset == "cifar10":
        write_fake_cifar(tmp_path / "data", "cifar10", n_train=10, n_test=8)
        data = dict(data_root=str(tmp_path / "data"), download=False)
    return iaat_eval.evaluate_run(run, parts={"whitebox"}, whitebox=((1, 1),), n_examples=8,
                                  **data, **kw)


def load_like_robustbench(robustbench, out, model_dir, monkeypatch, name="Iaat2019Export"):
    """An export loaded as RobustBench loads a model of its zoo: robustbench.utils.load_model with
    the entry a submission adds (its constructor: model.py's build) and the checkpoint where
    load_model looks for it, so nothing is downloaded (downloading fails the test). RobustBench
    has no digits benchmark: a digits model goes through the same code as a cifar10 one."""
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    spec = importlib.util.spec_from_file_location(f"exported_{out.name}", out / "model.py")
    definition = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(definition)
    zoo = robustbench.model_zoo.model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    monkeypatch.setitem(zoo, name, {"model": definition.build, "gdrive_id": "never-downloaded"})
    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", lambda *a: pytest.fail("download"))
    (model_dir / "cifar10" / "Linf").mkdir(parents=True)
    shutil.copy(out / "model.pt", model_dir / "cifar10" / "Linf" / f"{name}.pt")
    return robustbench.utils.load_model(name, model_dir=str(model_dir), dataset="cifar10",
                                        threat_model="Linf")


def assert_round_trip(run, out, tmp_path, robustbench, monkeypatch, n: int = 4):
    """The export of `run` in `out`, loaded by RobustBench, gives the project's logits."""
    cfg, ckpt = iaat_eval.run_config(run)
    ours = iaat_eval.load_model(run, "cpu", cfg, ckpt)
    theirs = load_like_robustbench(robustbench, out, tmp_path / "models", monkeypatch)
    channels, size = iaat_eval.DATASET_SHAPES[cfg.dataset][0], iaat_export.IMAGE_SIZES[cfg.dataset]
    x = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = ours(x)
        assert torch.allclose(theirs(x), logits, rtol=1e-5, atol=1e-5 * logits.abs().max())
        assert (logits[0] != logits[1]).any()  # inputs matter
    assert not theirs.training
    assert not re.search(r"^\s*(import|from) iaat", (out / "model.py").read_text(), re.M)
    return theirs


@pytest.mark.parametrize("dataset,model,robustbench_class", [
    ("digits", "smallcnn", None),
    ("cifar10", "resnet18", "robustbench.model_zoo.architectures.resnet.PreActResNet")])
def test_an_export_loads_in_robustbench_with_the_projects_logits(
        dataset, model, robustbench_class, tmp_path, robustbench, monkeypatch, no_md5):
    run = random_run(tmp_path / "run", dataset, model)
    quick_eval(run, tmp_path)
    out = tmp_path / "export"
    assert iaat.main(["export", str(run), str(out)]) == 0  # the CLI's hand-over
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.pt", "model.py"]
    theirs = assert_round_trip(run, out, tmp_path, robustbench, monkeypatch)
    classes = {f"{c.__module__}.{c.__qualname__}" for c in type(theirs).__mro__}
    if robustbench_class:  # RobustBench's own class, its keys: loaded strictly by load_model
        assert robustbench_class in classes
        assert {"mu", "sigma", "conv1.weight", "layer2.0.shortcut.0.weight", "bn.running_var",
                "linear.bias"} <= set(theirs.state_dict())
    else:  # the one-file definition beside the checkpoint
        assert not any(c.startswith("robustbench") for c in classes)
        assert {"mu", "sigma", "net.net.0.weight"} <= set(theirs.state_dict())


@pytest.mark.slow
def test_a_wideresnet_export_is_robustbenchs_wideresnet(tmp_path, robustbench, monkeypatch):
    """WideResNet-34-10 (46M weights; the evaluation recorded is a stand-in: any complete one of
    this checkpoint will do)."""
    run = random_run(tmp_path / "run", "cifar10", "wrn32-10")
    (run / "eval.json").write_text(json.dumps({"complete": True, "checkpoint": "last",
                                               "checkpoint_epoch": 3}))
    assert iaat_export.main([str(run), str(tmp_path / "export")]) == 0
    theirs = assert_round_trip(run, tmp_path / "export", tmp_path, robustbench, monkeypatch, n=2)
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet
    assert isinstance(theirs, WideResNet)
    assert {"block3.layer.4.conv2.weight", "block2.layer.0.convShortcut.weight", "bn1.bias",
            "fc.weight", "mu"} <= set(theirs.state_dict())


def test_keys_are_renamed_block_by_block():
    spec = iaat_export.ROBUSTBENCH_CLASSES
    assert iaat_export.exported_key("1.layers.3.shortcut.weight", spec["resnet18"]) == \
        "layer2.1.shortcut.0.weight"
    assert iaat_export.exported_key("1.layers.7.bn2.running_mean", spec["resnet18"]) == \
        "layer4.1.bn2.running_mean"
    assert iaat_export.exported_key("1.layers.10.shortcut.weight", spec["wrn32-10"]) == \
        "block3.layer.0.convShortcut.weight"
    assert iaat_export.exported_key("1.fc.weight", spec["resnet18"]) == "linear.weight"
    assert iaat_export.exported_key("0.std", None) == "sigma"
    assert iaat_export.exported_key("1.net.4.bias", None) == "net.net.4.bias"
    assert iaat_export.robustbench_class("digits", "resnet18") is None  # 1x8x8: not its classes


@pytest.mark.slow
def test_eval_and_export_write_robustbench_model_info(runs, tmp_path, robustbench, monkeypatch):
    """`iaat eval --parts autoattack` writes model_info with the fields and formats of
    RobustBench's files, filled from the run; RobustBench's own update_json (what its
    benchmark(to_disk=True) calls after AutoAttack) finds the same accuracies in it; the export
    carries it, and the record of the checkpoint."""
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    run = runs[0]
    res = iaat_eval.evaluate_run(run, parts={"autoattack"}, n_examples=20, name="robustbench")
    info = json.loads((run / "robustbench_model_info.json").read_text())
    assert set(info) <= {f.name for f in dataclasses.fields(robustbench.utils.ModelInfo)}
    assert LINF_FIELDS <= set(info)
    assert info["autoattack_acc"] == info["reported"] == str(round(100 * res["autoattack"], 2))
    assert float(info["clean_acc"]) == pytest.approx(100 * res["natural"], abs=0.005)
    assert res["autoattack"] < res["natural"]  # two different numbers, each in its field
    assert (info["eps"], info["architecture"], info["dataset"]) == ("51/255", "SmallCNN", "digits")
    assert (info["additional_data"], info["number_forward_passes"]) == (False, 1)
    assert info["link"] is info["name"] is info["venue"] is None  # PGD-AT: no paper to cite
    assert "last checkpoint (epoch 8 of 8)" in info["footnote"] and "20 of the 497" in info["footnote"]

    folder = tmp_path / "model_info" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    (folder / "Ours.json").write_text(json.dumps(info))
    monkeypatch.chdir(tmp_path)
    robustbench.utils.update_json(BenchmarkDataset.cifar_10, ThreatModel.Linf, "Ours",
                                  res["natural"], res["autoattack"], eps=0.2)
    again = json.loads((folder / "Ours.json").read_text())  # it sets eps and dataset (cifar10
    assert {k: v for k, v in again.items() if k not in ("eps", "dataset")} == \
        {k: v for k, v in info.items() if k not in ("eps", "dataset")}  # here) from its arguments

    out = tmp_path / "export"
    assert iaat_export.main([str(run), str(out), "--eval-name", "robustbench"]) == 0
    assert json.loads((out / "model_info.json").read_text()) == info
    record = json.loads((out / "export.json").read_text())
    assert (record["checkpoint"], record["epoch"]) == ("last", 8)
    assert record["evaluation"] == json.loads((run / "robustbench.json").read_text())
    assert record["chosen"].startswith("the last checkpoint: epoch 8 of 8")
    assert record["config"]["method"] == "at" and record["robustbench_class"] is None
    assert record["sha256"]["model.pt"] == hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["iaat"] == {k: v for k, v in record.items() if k != "sha256"}

    quick_eval(run, tmp_path, name="robustbench")  # no AutoAttack now: no stale model_info
    assert not (run / "robustbench_model_info.json").exists()


def test_model_info_of_an_iaat_run_cites_the_paper_and_says_what_was_attacked():
    res = {"dataset": "cifar10", "model": "resnet18", "method": "iaat", "checkpoint": "best",
           "checkpoint_epoch": 123, "epochs": 200, "eps_255": 8.000000000000002,
           "n_examples": 1000, "eval_seed": 3, "natural": 0.8726, "autoattack": 0.4011,
           "autoattack_details": {"version": "standard", "package": "pyautoattack 0.2.0",
                                  "norm": "Linf"}}
    info = iaat_report.model_info(res)
    assert info["link"] == "https://arxiv.org/abs/1910.08051" and info["eps"] == "8/255"
    assert (info["clean_acc"], info["autoattack_acc"]) == ("87.26", "40.11")
    assert info["architecture"] == "PreActResNet-18"
    assert "best checkpoint (epoch 123 of 200)" in info["footnote"]
    assert "1000 of the 10000 test images (seed 3)" in info["footnote"]
    assert "whole test set" in iaat_report.model_info(dict(res, n_examples=10_000))["footnote"]
    with pytest.raises(ValueError, match="autoattack"):
        iaat_report.model_info({k: v for k, v in res.items() if k != "autoattack_details"})


def test_the_best_checkpoint_says_how_it_was_chosen(tmp_path):
    run = random_run(tmp_path / "run", "digits", "smallcnn", val_size=50)
    best = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(dict(best, epoch=2), run / "best.pt")  # checkpoint.pt holds epoch 3
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val_pgd": v}) + "\n"
                                               for e, v in ((1, 0.3), (2, 0.5), (3, 0.4))))
    quick_eval(run, tmp_path, checkpoint="best")
    record = iaat_export.export_run(run, tmp_path / "export", checkpoint="best")
    assert (record["checkpoint"], record["epoch"]) == ("best", 2)
    assert "epoch 2 of 3" in record["chosen"] and "val_pgd 0.5000" in record["chosen"]
    assert "50 training images held out" in record["chosen"]


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("iaat: error:") and "Traceback" not in err
    for f in fragments:
        assert f in err, err


def test_bad_runs_and_missing_evaluations_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "export"
    assert iaat.main(["export", str(tmp_path / "nothing"), str(out)]) == 1
    _one_line_error(capsys, "checkpoint.pt not found")
    run = random_run(tmp_path / "run", "digits", "smallcnn")
    assert iaat.main(["export", str(run), str(out)]) == 1
    _one_line_error(capsys, "eval.json not found", f"iaat eval {run}")
    assert iaat.main(["export", str(run), str(out), "--checkpoint", "best"]) == 1
    _one_line_error(capsys, "--val-size")
    (run / "eval.json").write_text(json.dumps({"complete": False}))
    assert iaat.main(["export", str(run), str(out)]) == 1
    _one_line_error(capsys, "unfinished evaluation")
    (run / "eval.json").write_text(json.dumps({"complete": True, "checkpoint": "last",
                                               "checkpoint_epoch": 2}))
    assert iaat.main(["export", str(run), str(out)]) == 1
    _one_line_error(capsys, "at epoch 2", "holds epoch 3")
    (run / "checkpoint.pt").write_bytes(b"half a checkpoint")
    assert iaat.main(["export", str(run), str(out)]) == 1
    _one_line_error(capsys, "unreadable")
    assert os.listdir(tmp_path) == ["run"]  # no export, no temporary folder


def test_nothing_is_written_half(tmp_path, capsys, monkeypatch):
    run = random_run(tmp_path / "run", "digits", "smallcnn")
    quick_eval(run, tmp_path)
    capsys.readouterr()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("mine")
    assert iaat_export.main([str(run), str(taken)]) == 1
    _one_line_error(capsys, "is not an iaat export")
    assert os.listdir(taken) == ["mine.txt"]

    out = tmp_path / "export"
    assert iaat_export.main([str(run), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = iaat_export.atomic_write

    def fail_on_the_definition(path, write):
        if path.name == "model.py":
            raise OSError("disk full")
        real(path, write)
    monkeypatch.setattr(iaat_export, "atomic_write", fail_on_the_definition)
    assert iaat_export.main([str(run), str(out)]) == 1  # the earlier export stays whole
    _one_line_error(capsys, "disk full")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert iaat_export.main([str(run), str(tmp_path / "new")]) == 1
    assert sorted(os.listdir(tmp_path)) == ["export", "run", "taken"]  # no temporary folder left
    monkeypatch.setattr(iaat_export, "atomic_write", real)
    assert iaat_export.main([str(run), str(out)]) == 0  # an earlier export is replaced
