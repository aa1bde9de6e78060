"""DigitsDataModule: shapes, values, seeded splits, and validation of the settings."""

import pytest
import torch

import vae.data
from vae.data import DigitsDataModule, InMemoryDataModule
from vae.data.digits import load_digit_images
from vae.data.splits import split_indices


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


def test_metadata_is_known_before_setup():
    dm = DigitsDataModule()
    assert isinstance(dm, InMemoryDataModule)
    assert (dm.name, dm.image_shape, dm.num_classes) == ("digits", (1, 8, 8), 10)
    assert dm.train_split is None  # nothing was loaded to answer


@pytest.mark.parametrize(
    ("class_name", "name", "shape"),
    [
        ("DigitsDataModule", "digits", (1, 8, 8)),
        ("MNISTDataModule", "mnist", (1, 28, 28)),
        ("FashionMNISTDataModule", "fashion_mnist", (1, 28, 28)),
        ("CIFAR10DataModule", "cifar10", (3, 32, 32)),
    ],
)
def test_every_datamodule_states_its_shape_without_data(tmp_path, class_name, name, shape):
    # The lead builds the model from image_shape before setup(); no file needs to exist.
    dm = getattr(vae.data, class_name)(root=str(tmp_path / "empty"))
    assert (dm.name, dm.image_shape, dm.num_classes) == (name, shape, 10)


def test_split_sizes_shapes_and_values(digits):
    sizes = [len(s) for s in (digits.train_split, digits.val_split, digits.test_split)]
    assert sizes == [1437, 180, 180]
    for split in (digits.train_split, digits.val_split, digits.test_split):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 8, 8)
        # Intensities are k / 16 for k in 0..16, so the range is exactly [0, 1].
        scaled = split.images * 16
        assert torch.equal(scaled, scaled.round())
        assert split.images.min() == 0 and split.images.max() == 1
        assert set(split.labels.tolist()) == set(range(10))
    assert len(digits.train_dataloader()) == 23  # ceil(1437 / 64)


def test_splits_are_disjoint_and_cover_the_dataset(digits):
    everything = load_digit_images()
    train, val, test = split_indices(1797, (180, 180), split_seed=0)
    assert torch.equal(torch.cat([train, val, test]).sort().values, torch.arange(1797))
    assert torch.equal(digits.val_split.images, everything.images[val])
    assert torch.equal(digits.test_split.labels, everything.labels[test])
    assert torch.equal(digits.train_split.images, everything.images[train])


def test_split_ignores_global_seed_and_follows_split_seed():
    torch.manual_seed(1)
    first = DigitsDataModule()
    first.setup()
    torch.manual_seed(2)
    second = DigitsDataModule()
    second.setup()
    assert torch.equal(first.val_split.images, second.val_split.images)
    assert torch.equal(first.train_split.labels, second.train_split.labels)
    other = DigitsDataModule(split_seed=1)
    other.setup()
    assert not torch.equal(first.val_split.images, other.val_split.images)


def test_configurable_sizes():
    dm = DigitsDataModule(val_size=100, test_size=300)
    dm.setup()
    assert [len(dm.train_split), len(dm.val_split), len(dm.test_split)] == [1397, 100, 300]


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size_names_the_key(batch_size):
    with pytest.raises(ValueError, match="data.batch_size"):
        DigitsDataModule(batch_size=batch_size)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="none, static, dynamic"):
        DigitsDataModule(binarize="threshold")
    with pytest.raises(ValueError, match="data.num_workers"):
        DigitsDataModule(num_workers=-1)
    with pytest.raises(ValueError, match="data.val_size"):
        DigitsDataModule(val_size=0)
    with pytest.raises(ValueError, match="leaves no training"):
        DigitsDataModule(val_size=900, test_size=897)


def test_dataloader_before_setup_says_what_to_do():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


def test_hyperparameters_include_subclass_arguments():
    dm = DigitsDataModule(batch_size=32, val_size=100, binarize="static")
    assert dm.hparams["batch_size"] == 32
    assert dm.hparams["val_size"] == 100
    assert dm.hparams["binarize"] == "static"


def test_a_checkpoint_of_another_dataset_or_split_is_refused():
    import pytest

    from vae.training.checkpoints import CheckpointError, check_same_data

    data = DigitsDataModule(binarize="dynamic")
    saved = {
        "datamodule_hparams_name": "hparams",
        "DigitsDataModule": {},
        "datamodule_hyper_parameters": dict(data.hparams),
    }
    check_same_data(saved, data)
    check_same_data(
        {**saved, "datamodule_hyper_parameters": {**data.hparams, "num_workers": 2}}, data
    )  # speed only
    other = {k: v for k, v in saved.items() if k != "DigitsDataModule"}
    with pytest.raises(CheckpointError, match="trained on FashionMNISTDataModule"):
        check_same_data({**other, "FashionMNISTDataModule": {}}, data)
    with pytest.raises(CheckpointError, match="data.split_seed: checkpoint 3, config 0"):
        check_same_data(
            {**saved, "datamodule_hyper_parameters": {**data.hparams, "split_seed": 3}}, data
        )
