"""CIFAR10DataModule through torchvision, on tiny pickles written here (MD5s patched in)."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from vae.data import CIFAR10DataModule, DatasetNotFoundError
from vae.data.splits import split_indices

PER_BATCH, NUM_TEST = 4, 6


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """Writes CIFAR-10's python-version files with random data and tells torchvision their
    MD5s. Rows are 3072 bytes: the red, green, then blue 32x32 planes."""
    folder = tmp_path / datasets.CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}

    def write(name, count):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, count).tolist()
        with open(folder / name, "wb") as file:
            pickle.dump({"data": data, "labels": labels}, file)
        arrays[name] = (data, labels)
        return [name, md5(folder / name)]

    train_list = [write(f"data_batch_{i}", PER_BATCH) for i in range(1, 6)]
    test_list = [write("test_batch", NUM_TEST)]
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, file)
    meta = {"filename": "batches.meta", "key": "label_names", "md5": md5(folder / "batches.meta")}
    monkeypatch.setattr(datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(datasets.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(datasets.CIFAR10, "meta", meta)
    return tmp_path, arrays


def test_loads_channels_first_in_unit_range(fake_cifar):
    root, arrays = fake_cifar
    dm = CIFAR10DataModule(root=str(root), val_size=5, batch_size=7)
    assert (dm.name, dm.image_shape, dm.num_classes) == ("cifar10", (3, 32, 32), 10)
    dm.prepare_data()
    dm.setup()
    train_rows = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    official = torch.from_numpy(train_rows).view(-1, 3, 32, 32).float() / 255
    labels = torch.tensor(sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), []))
    train, val = split_indices(5 * PER_BATCH, (5,), split_seed=0)
    assert torch.equal(dm.train_split.images, official[train])
    assert torch.equal(dm.val_split.images, official[val])
    assert torch.equal(dm.val_split.labels, labels[val])
    test_rows, test_labels = arrays["test_batch"]
    assert torch.equal(
        dm.test_split.images, torch.from_numpy(test_rows).view(-1, 3, 32, 32).float() / 255
    )
    assert dm.test_split.labels.tolist() == test_labels
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_missing_folder_lists_the_ways_to_get_it(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as caught:
            step()
        message = str(caught.value)
        assert "cifar-10-batches-py" in message and f"data.root={tmp_path}" in message
        assert "data.download=true" in message and "cifar-10-python.tar.gz" in message


def test_damaged_file_is_reported(fake_cifar):
    root, _ = fake_cifar
    damaged = root / datasets.CIFAR10.base_folder / "data_batch_3"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(DatasetNotFoundError, match="MD5") as caught:
        CIFAR10DataModule(root=str(root), val_size=5).setup()
    assert "data.root" in str(caught.value)


def test_val_size_must_leave_training_images(fake_cifar):
    root, _ = fake_cifar
    with pytest.raises(ValueError, match="data.val_size=20"):
        CIFAR10DataModule(root=str(root), val_size=20).setup()
