"""Batches from InMemoryDataModule: coverage, gather correctness, and reproducible order."""

import lightning as L
import pytest
import torch

from vae.data import ImageSplit, InMemoryDataModule
from vae.data.batching import EpochShuffleSampler

NUM_EXAMPLES = 50


class NumberedDataModule(InMemoryDataModule):
    """Example i has label i and every pixel equal to i / NUM_EXAMPLES, so batches can be
    traced back to the examples they hold."""

    name = "numbered"
    image_shape = (1, 2, 3)
    num_classes = NUM_EXAMPLES

    def load_splits(self):
        labels = torch.arange(NUM_EXAMPLES)
        images = (labels.float() / NUM_EXAMPLES).view(-1, 1, 1, 1).expand(-1, 1, 2, 3).contiguous()
        split = ImageSplit(images, labels)
        return split, split.subset(torch.arange(10)), split.subset(torch.arange(10, 20))


def make(**kwargs) -> NumberedDataModule:
    dm = NumberedDataModule(batch_size=kwargs.pop("batch_size", 8), **kwargs)
    dm.setup()
    return dm


def epoch_labels(loader, check_images: bool = True) -> list[int]:
    labels = []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(y), 1, 2, 3)
        if check_images:  # the gathered image is the labelled example's image
            assert torch.equal(x[:, 0, 0, 0], y.float() / NUM_EXAMPLES)
        labels += y.tolist()
    return labels


def test_one_epoch_serves_every_example_exactly_once_in_full_batches():
    loader = make(seed=0).train_dataloader()
    sizes = [len(y) for _, y in loader]
    assert sizes == [8] * 6 + [2] and len(loader) == 7
    labels = epoch_labels(loader)
    assert sorted(labels) == list(range(NUM_EXAMPLES))
    assert labels != list(range(NUM_EXAMPLES))  # shuffled


def test_eval_loaders_are_in_order():
    dm = make(seed=0)
    assert epoch_labels(dm.val_dataloader()) == list(range(10))
    assert epoch_labels(dm.test_dataloader()) == list(range(10, 20))


def test_order_is_a_function_of_seed_and_epoch():
    a, b, c = (make(seed=s).train_dataloader() for s in (5, 5, 6))
    a0, a1 = epoch_labels(a), epoch_labels(a)
    assert a0 != a1  # a new order each epoch
    assert [epoch_labels(b), epoch_labels(b)] == [a0, a1]
    assert epoch_labels(c) != a0
    # Epoch 1's order can be rebuilt directly, without replaying epoch 0 (for resume).
    fresh = make(seed=5).train_dataloader()
    fresh.sampler.set_epoch(1)
    assert epoch_labels(fresh) == a1


def test_default_seed_is_torch_initial_seed():
    torch.manual_seed(123)
    implicit = epoch_labels(make().train_dataloader())
    torch.manual_seed(999)
    assert epoch_labels(make(seed=123).train_dataloader()) == implicit


def test_iterating_does_not_consume_the_global_rng():
    loader = make(seed=0, binarize="dynamic").train_dataloader()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    epoch_labels(loader, check_images=False)
    assert torch.equal(torch.rand(3), expected)


def test_worker_processes_give_the_same_order():
    serial = epoch_labels(make(seed=2).train_dataloader())
    loader = make(seed=2, num_workers=1).train_dataloader()
    assert epoch_labels(loader) == serial


def test_sampler_rejects_an_empty_dataset():
    with pytest.raises(ValueError, match="num_examples"):
        EpochShuffleSampler(0, seed=0)


class RecordLabels(L.LightningModule):
    """Records the labels of every training batch, per epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).extend(y.tolist())
        return (self.weight * x.mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_epoch_e_uses_the_order_of_seed_and_e():
    def fit() -> dict[int, list[int]]:
        model = RecordLabels()
        trainer = L.Trainer(
            max_epochs=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=NumberedDataModule(batch_size=16, seed=11))
        return model.seen

    seen = fit()
    assert sorted(seen) == [0, 1, 2]
    sampler = EpochShuffleSampler(NUM_EXAMPLES, seed=11)
    for epoch, labels in seen.items():
        assert labels == sampler.order(epoch).tolist()
    assert seen[0] != seen[1]
    assert fit() == seen


def test_batches_are_pinned_only_for_a_cuda_trainer(monkeypatch):
    """On a GPU machine, a CPU run must not pin (and copy) every batch: the default follows
    the trainer's device, and an explicit data.pin_memory wins."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    dm = make()
    assert dm.pin_memory  # no trainer yet: pin if CUDA is there
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert not dm.pin_memory
    assert not dm.train_dataloader().pin_memory and not dm.val_dataloader().pin_memory
    assert make(pin_memory=True).pin_memory and not make(pin_memory=False).pin_memory
