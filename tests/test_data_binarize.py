"""Binarization: static is fixed, dynamic is resampled per batch with the right mean, and
validation / test images are the same in every epoch and run."""

import pytest
import torch

from vae.data import DigitsDataModule
from vae.data.batching import ImageTensorDataset
from vae.data.binarize import sample_binary


def epoch_in_dataset_order(loader) -> torch.Tensor:
    """Run one epoch and put the examples back in dataset order, using the sampler's order."""
    epoch = loader.sampler.epoch
    images = torch.cat([x for x, _ in loader])
    order = loader.sampler.order(epoch)
    restored = torch.empty_like(images)
    restored[order] = images
    return restored


def make(binarize: str, seed: int = 0) -> DigitsDataModule:
    dm = DigitsDataModule(binarize=binarize, seed=seed)
    dm.setup()
    return dm


def intensities() -> torch.Tensor:
    dm = make("none")
    return dm.train_split.images


def test_sample_binary_is_exact_at_0_and_1_and_has_mean_p():
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 1.0]).repeat(1000)
    assert torch.equal(sample_binary(p, generator), p)
    draws = sample_binary(torch.full((100_000,), 0.3), generator)
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    # Mean of 1e5 Bernoulli(0.3): standard error 0.00145; allow 5 of them.
    assert abs(draws.mean().item() - 0.3) < 0.0073


def test_none_serves_the_intensities():
    dm = make("none")
    restored = epoch_in_dataset_order(dm.train_dataloader())
    assert torch.equal(restored, dm.train_split.images)
    assert len(restored.unique()) == 17  # the grey levels k / 16 survive


def test_static_is_binary_and_fixed_across_epochs_and_seeds():
    dm = make("static", seed=0)
    loader = dm.train_dataloader()
    first, second = epoch_in_dataset_order(loader), epoch_in_dataset_order(loader)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first, second)
    # Fixed by split_seed, not by the training seed.
    assert torch.equal(first, make("static", seed=7).train_split.images)
    # It is a sample, not a threshold: grey pixels go both ways.
    grey = (intensities() > 0.3) & (intensities() < 0.7)
    assert 0.3 < first[grey].mean().item() < 0.7


def test_dynamic_resamples_every_epoch_with_the_intensities_as_mean():
    dm = make("dynamic")
    loader = dm.train_dataloader()
    epochs = torch.stack([epoch_in_dataset_order(loader) for _ in range(40)])
    assert set(epochs.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(epochs[0], epochs[1])
    p = intensities()
    assert torch.equal(epochs[:, p == 0].amax(), torch.tensor(0.0))
    assert torch.equal(epochs[:, p == 1].amin(), torch.tensor(1.0))
    # Average of 40 draws per pixel: per-pixel error is at most 0.5 / sqrt(40) = 0.079 in
    # standard deviation; the mean absolute error over all pixels is far smaller.
    mean = epochs.mean(0)
    assert (mean - p).abs().mean().item() < 0.04
    assert abs(mean.mean().item() - p.mean().item()) < 0.002


def test_dynamic_draws_depend_on_the_seed():
    a = epoch_in_dataset_order(make("dynamic", seed=1).train_dataloader())
    b = epoch_in_dataset_order(make("dynamic", seed=1).train_dataloader())
    c = epoch_in_dataset_order(make("dynamic", seed=2).train_dataloader())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_splits_are_binarized_once_with_a_fixed_seed(split):
    dynamic = make("dynamic", seed=3)
    loader = getattr(dynamic, f"{split}_dataloader")()
    first = torch.cat([x for x, _ in loader])
    second = torch.cat([x for x, _ in loader])
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first, second)
    # Same binary images whatever the training seed, and under static too, so numbers
    # from dynamic and static runs are comparable.
    other_seed = make("dynamic", seed=4)
    assert torch.equal(first, getattr(other_seed, f"{split}_split").images)
    assert torch.equal(first, getattr(make("static"), f"{split}_split").images)


def test_ddp_processes_draw_different_noise():
    images, labels = torch.full((64, 1, 4, 4), 0.5), torch.zeros(64, dtype=torch.int64)
    index = list(range(64))
    rank0 = ImageTensorDataset(images, labels, resample_seed=1, process_rank=0)
    rank1 = ImageTensorDataset(images, labels, resample_seed=1, process_rank=1)
    again = ImageTensorDataset(images, labels, resample_seed=1, process_rank=0)
    assert torch.equal(rank0.__getitems__(index)[0], again.__getitems__(index)[0])
    assert not torch.equal(rank0.__getitems__(index)[0], rank1.__getitems__(index)[0])


def test_dynamic_noise_of_an_epoch_depends_only_on_seed_and_epoch():
    """A run resumed at epoch 2 must see exactly the binary images of an uninterrupted run."""
    uninterrupted = make("dynamic", seed=5).train_dataloader()
    sampler = uninterrupted.sampler
    batches = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches.append(next(iter(uninterrupted))[0])
    resumed = make("dynamic", seed=5).train_dataloader()
    resumed.sampler.set_epoch(2)
    assert torch.equal(next(iter(resumed))[0], batches[2])
    assert not torch.equal(batches[1], batches[2])
