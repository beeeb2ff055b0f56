"""Data: the digits split, batched augmentation, and the real torchvision CIFAR path, read from
small files written in CIFAR's real on-disk format (pickled batches)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import iaat
import iaat_run
from conftest import write_fake_cifar


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_through_torchvision(tmp_path, no_md5, name):
    written = write_fake_cifar(tmp_path, name)
    data = iaat.load_cifar(name, str(tmp_path), download=False)
    assert data.train_x.shape == (40, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (20, 3, 32, 32) and data.num_classes == (10 if name == "cifar10" else 100)
    test_rows, test_labels = written["test_batch" if name == "cifar10" else "test"]
    # a CIFAR row is 1024 red, then 1024 green, then 1024 blue values, each row-major
    assert torch.equal(data.test_x, torch.from_numpy(test_rows.reshape(-1, 3, 32, 32)))
    assert data.test_y.tolist() == test_labels
    assert data.augmentation == "cifar" and len(data.mean) == 3


def test_missing_cifar_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(iaat_run.IAATError, match="cifar10 not found .*--no-download"):
        iaat.load_cifar("cifar10", str(tmp_path), download=False)


def test_cifar_trains_end_to_end_from_disk(tmp_path, no_md5, capsys):
    write_fake_cifar(tmp_path / "data", "cifar10")
    rc = iaat.main(["--dataset", "cifar10", "--model", "smallcnn", "--data-root", str(tmp_path / "data"),
                    "--no-download", "--epochs", "2", "--warmup", "1", "--batch-size", "16",
                    "--attack-steps", "2", "--eval-steps", "2", "--eval-subset", "8",
                    "--out", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "final cifar10 smallcnn iaat" in out
    mem = np.load(tmp_path / "run" / "eps_history.npy")
    assert mem.shape == (2, 40) and np.allclose(mem[0], 8 / 255) and not np.allclose(mem[1], 8 / 255)


def test_digits_split_is_fixed_by_seed_and_stratified():
    a, b, c = iaat.load_digits(0), iaat.load_digits(0), iaat.load_digits(1)
    assert a.train_x.shape == (1300, 1, 8, 8) and a.test_x.shape == (497, 1, 8, 8)
    assert a.train_x.dtype == torch.uint8 and a.train_x.max() == 255 and a.train_x.min() == 0
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_x, c.test_x)
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 51  # stratified: ~49.7 per class
    assert a.augmentation == "digits"


def test_digits_augmentation_only_shifts_by_at_most_one_pixel():
    x = iaat.load_digits(0).train_x[:64]
    out = iaat.augment(x, "digits", torch.Generator().manual_seed(0))
    padded = F.pad(iaat.to_float(x), (1, 1, 1, 1))
    shifts = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])
    match = (shifts == out[None]).flatten(2).all(2).squeeze(-1)  # (9 shifts, 64 samples)
    assert match.any(0).all()  # every output is a shift of its input, never a mirror image
    assert (~match[4]).sum() > 32  # and most are moved (shift index 4 is no shift)


def test_cifar_augmentation_is_crop_and_flip():
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    out = iaat.augment(x, "cifar", torch.Generator().manual_seed(0))
    padded = F.pad(iaat.to_float(x), (4,) * 4, mode="reflect")
    flipped = 0
    for i in range(len(x)):
        crops = padded[i].unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)  # 9x9 crops
        plain = (crops == out[i]).flatten(2).all(2).any()
        mirror = (crops == out[i].flip(2)).flatten(2).all(2).any()
        assert plain or mirror
        flipped += int(mirror and not plain)
    assert 70 < flipped < 130


def test_epoch_order_depends_on_seed_and_epoch_only():
    perm = lambda s, e: torch.randperm(50, generator=iaat.epoch_generator(s, e, "cpu"))  # noqa
    assert torch.equal(perm(0, 3), perm(0, 3))
    assert not torch.equal(perm(0, 3), perm(0, 4)) and not torch.equal(perm(0, 3), perm(1, 3))
