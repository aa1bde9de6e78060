"""MNIST-format loading from tiny IDX files written here, from data.root and from a fake
Debian folder; missing, partial and damaged files; and the real Debian Fashion-MNIST."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from vae.data import DatasetNotFoundError, FashionMNISTDataModule, MNISTDataModule
from vae.data.idx import IDXFormatError, read_idx
from vae.data.mnist import DEBIAN_FASHION_MNIST_DIR, IDX_FILES
from vae.data.splits import split_indices

NUM_TRAIN, NUM_TEST = 20, 10


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian uint32 sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(idx_bytes(array)))
    else:
        path.write_bytes(idx_bytes(array))
    return path


def fake_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (NUM_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, NUM_TRAIN, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (NUM_TEST, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, NUM_TEST, dtype=np.uint8),
    }


def write_dataset(folder: Path, arrays, compress: bool, roles=tuple(IDX_FILES)) -> None:
    for role in roles:
        write_idx(folder / IDX_FILES[role], arrays[role], compress)


def as_intensities(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).unsqueeze(1).float() / 255


def check_round_trip(dm, arrays) -> None:
    dm.prepare_data()
    dm.setup()
    train, val = split_indices(NUM_TRAIN, (5,), split_seed=0)
    official = as_intensities(arrays["train_images"])
    assert torch.equal(dm.train_split.images, official[train])
    assert torch.equal(dm.val_split.images, official[val])
    assert torch.equal(dm.test_split.images, as_intensities(arrays["test_images"]))
    assert torch.equal(
        dm.train_split.labels, torch.from_numpy(arrays["train_labels"]).long()[train]
    )
    assert torch.equal(dm.test_split.labels, torch.from_numpy(arrays["test_labels"]).long())
    assert dm.test_split.images.dtype == torch.float32 and dm.test_split.images.max() <= 1


@pytest.mark.parametrize("compress", [False, True])
def test_reads_from_root_in_torchvision_layout(tmp_path, compress):
    arrays = fake_arrays(0)
    write_dataset(tmp_path / "FashionMNIST" / "raw", arrays, compress)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=5, search_paths=[])
    check_round_trip(dm, arrays)
    assert dm.image_shape == (1, 28, 28) and dm.name == "fashion_mnist"


def test_reads_debian_folder_in_place_without_copying(tmp_path):
    arrays = fake_arrays(1)
    debian = tmp_path / "usr_share_datasets_fashion-mnist"
    write_dataset(debian, arrays, compress=True)
    root = tmp_path / "root"
    root.mkdir()
    dm = FashionMNISTDataModule(root=str(root), val_size=5, search_paths=[str(debian)])
    assert dm.locate_files() == {role: debian / f"{name}.gz" for role, name in IDX_FILES.items()}
    check_round_trip(dm, arrays)
    # Read in place: nothing was extracted, copied or linked under root.
    assert list(root.rglob("*")) == []


def test_root_wins_over_search_paths(tmp_path):
    in_root, in_debian = fake_arrays(2), fake_arrays(3)
    write_dataset(tmp_path / "FashionMNIST" / "raw", in_root, compress=False)
    write_dataset(tmp_path / "debian", in_debian, compress=True)
    dm = FashionMNISTDataModule(
        root=str(tmp_path), val_size=5, search_paths=[str(tmp_path / "debian")]
    )
    check_round_trip(dm, in_root)


def test_mnist_uses_its_own_folder_and_no_debian_default(tmp_path):
    arrays = fake_arrays(4)
    write_dataset(tmp_path / "FashionMNIST" / "raw", arrays, compress=False)
    assert MNISTDataModule().search_paths == ()
    assert FashionMNISTDataModule().search_paths == (Path(DEBIAN_FASHION_MNIST_DIR),)
    with pytest.raises(DatasetNotFoundError):
        MNISTDataModule(root=str(tmp_path)).prepare_data()
    write_dataset(tmp_path / "MNIST" / "raw", arrays, compress=True)
    check_round_trip(MNISTDataModule(root=str(tmp_path), val_size=5), arrays)


def test_file_names_match_torchvision():
    for cls in (datasets.MNIST, datasets.FashionMNIST):
        assert {name for name, _ in cls.resources} == {f"{n}.gz" for n in IDX_FILES.values()}


def test_missing_dataset_lists_every_way_to_get_it(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path), search_paths=[str(tmp_path / "nowhere")])
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as caught:
            step()
        message = str(caught.value)
        assert isinstance(caught.value, FileNotFoundError)
        assert "apt-get install dataset-fashion-mnist" in message
        assert str(tmp_path / "FashionMNIST" / "raw") in message
        assert "data.download=true" in message
        assert f"data.root={tmp_path}" in message
        assert str(tmp_path / "nowhere") in message


def test_partial_folder_names_the_missing_files(tmp_path):
    write_dataset(
        tmp_path / "MNIST" / "raw", fake_arrays(5), False, roles=("train_images", "train_labels")
    )
    with pytest.raises(DatasetNotFoundError, match="incomplete, missing") as caught:
        MNISTDataModule(root=str(tmp_path)).setup()
    assert "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in str(caught.value)
    assert "apt-get" not in str(caught.value)  # no Debian package for MNIST


def test_partial_root_falls_back_to_a_complete_folder_with_a_warning(tmp_path):
    arrays = fake_arrays(6)
    write_dataset(tmp_path / "FashionMNIST" / "raw", arrays, False, roles=("test_labels",))
    write_dataset(tmp_path / "debian", arrays, compress=True)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=5, search_paths=[tmp_path / "debian"])
    with pytest.warns(UserWarning, match="incomplete"):
        check_round_trip(dm, arrays)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file_is_reported_with_its_path(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw, fake_arrays(7), compress)
    damaged = next(raw.glob("train-images*"))
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(DatasetNotFoundError, match="truncated") as caught:
        MNISTDataModule(root=str(tmp_path), val_size=5).setup()
    assert str(damaged) in str(caught.value) and "data.root" in str(caught.value)


def test_files_that_do_not_belong_together_are_reported(tmp_path):
    arrays = fake_arrays(8)
    arrays["train_labels"] = arrays["train_labels"][:-1]
    write_dataset(tmp_path / "MNIST" / "raw", arrays, compress=False)
    with pytest.raises(DatasetNotFoundError, match="do not belong together"):
        MNISTDataModule(root=str(tmp_path), val_size=5).setup()


def test_labels_file_in_place_of_images_is_reported(tmp_path):
    arrays = fake_arrays(9)
    arrays["test_images"] = arrays["test_labels"]
    write_dataset(tmp_path / "MNIST" / "raw", arrays, compress=False)
    with pytest.raises(DatasetNotFoundError, match=r"not \(N, 28, 28\) images"):
        MNISTDataModule(root=str(tmp_path), val_size=5).setup()


def test_read_idx_rejects_non_idx_and_other_types(tmp_path):
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(IDXFormatError, match="IDX header"):
        read_idx(tmp_path / "text")
    (tmp_path / "ints").write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 1) + b"\0\0\0\1")
    with pytest.raises(IDXFormatError, match="0x0c"):
        read_idx(tmp_path / "ints")
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert torch.equal(read_idx(write_idx(tmp_path / "ok", array, True)), torch.from_numpy(array))


def test_val_size_must_leave_training_images(tmp_path):
    write_dataset(tmp_path / "MNIST" / "raw", fake_arrays(10), compress=False)
    with pytest.raises(ValueError, match="data.val_size=20"):
        MNISTDataModule(root=str(tmp_path), val_size=20).setup()
    with pytest.raises(ValueError, match="list of folders"):
        MNISTDataModule(search_paths="/usr/share")


class FashionMNIST:
    """Stands in for torchvision's class: 'downloads' by writing the files where it would."""

    arrays = fake_arrays(11)
    calls: list = []

    def __init__(self, root, train, download):
        FashionMNIST.calls.append((root, train, download))
        write_dataset(Path(root) / "FashionMNIST" / "raw", self.arrays, compress=False)


class MNIST:
    """Stands in for torchvision's class when offline."""

    def __init__(self, root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")


def test_download_only_when_allowed_and_into_root(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "torchvision_class", FashionMNIST)
    FashionMNIST.calls = []
    with pytest.raises(DatasetNotFoundError):
        FashionMNISTDataModule(root=str(tmp_path), search_paths=[]).prepare_data()
    assert FashionMNIST.calls == []
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=5, download=True, search_paths=[])
    check_round_trip(dm, FashionMNIST.arrays)
    assert FashionMNIST.calls == [(str(tmp_path), True, True)]


def test_failed_download_gives_the_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(MNISTDataModule, "torchvision_class", MNIST)
    with pytest.raises(DatasetNotFoundError, match="no network") as caught:
        MNISTDataModule(root=str(tmp_path), download=True).prepare_data()
    assert "Ways to get it" in str(caught.value)


@pytest.mark.skipif(
    not Path(DEBIAN_FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=128)
    dm.prepare_data()
    dm.setup()
    sizes = [len(s) for s in (dm.train_split, dm.val_split, dm.test_split)]
    assert sizes == [55000, 5000, 10000]
    # Fashion-MNIST is balanced: 6000 of each class in training, 1000 in test.
    labels = torch.cat([dm.train_split.labels, dm.val_split.labels])
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert torch.bincount(dm.test_split.labels).tolist() == [1000] * 10
    images = dm.train_split.images
    assert images.shape[1:] == (1, 28, 28) and images.min() == 0 and images.max() == 1
    assert list(tmp_path.rglob("*")) == []
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and y.shape == (128,)
