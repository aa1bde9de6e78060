"""`data.on_device` (issue 19): the in-memory splits live on the training GPU, so a batch is one
gather in device memory with no host-to-device copy of images. Where they are served from is
decided without touching CUDA (tested here on any machine); the CUDA path itself runs where a GPU
is present."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.train import CONFIG_DIR
from vae.data import DigitsDataModule
from vae.training.config import ConfigError, validate_config

CUDA = torch.device("cuda", 0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_trainer(dm: DigitsDataModule, device: torch.device) -> DigitsDataModule:
    """Attach a stand-in trainer whose strategy trains on ``device`` (no CUDA call is made)."""
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=device), global_rank=0, world_size=1
    )
    return dm


@pytest.mark.parametrize(
    ("on_device", "num_workers", "trainer_device", "served"),
    [
        (None, 0, CUDA, CUDA),  # the default on a GPU: the splits go to the GPU
        (None, 2, CUDA, "cpu"),  # workers gather on the host
        (None, 0, torch.device("cpu"), "cpu"),
        (False, 0, CUDA, "cpu"),
        (True, 0, CUDA, CUDA),
        (True, 0, torch.device("cpu"), "cpu"),  # "the training device" is the CPU here
        (True, 0, None, "cpu"),  # no trainer: the host
    ],
)
def test_serving_device_follows_the_trainer(on_device, num_workers, trainer_device, served):
    dm = DigitsDataModule(on_device=on_device, num_workers=num_workers)
    if trainer_device is not None:
        on_trainer(dm, trainer_device)
    assert dm.serving_device == torch.device(served)
    if dm.serving_device.type == "cuda":
        assert dm.pin_memory is False  # nothing to pin: the batches never touch the host


def test_on_device_with_workers_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match=r"data.on_device=true .*data.num_workers=0"):
        DigitsDataModule(on_device=True, num_workers=2)


def test_on_device_must_be_a_boolean_or_null():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data.on_device=gpu"])
    with pytest.raises(ConfigError, match=r"data.on_device='gpu' is invalid: expected true, false"):
        validate_config(cfg)


def batches(dm: DigitsDataModule, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return [(x.cpu(), y.cpu()) for x, y in loader]


def test_on_device_on_the_cpu_serves_the_batches_of_the_default(tmp_path):
    plain = DigitsDataModule(binarize="dynamic", seed=3, batch_size=100)
    served = DigitsDataModule(binarize="dynamic", seed=3, batch_size=100, on_device=True)
    for dm in (plain, served):
        dm.setup()
        on_trainer(dm, torch.device("cpu"))
    for split in ("train", "val"):
        for (x, y), (x2, y2) in zip(batches(plain, split), batches(served, split), strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)


@needs_cuda
def test_on_the_gpu_batches_are_gathered_and_binarized_there_reproducibly():
    dm = DigitsDataModule(binarize="dynamic", seed=3, batch_size=100)
    dm.setup()
    on_trainer(dm, CUDA)
    loader = dm.train_dataloader()
    assert loader.dataset.images.device.type == "cuda" and not loader.pin_memory
    first = [(x.clone(), y.clone()) for x, y in loader]
    x, y = first[0]
    assert x.device.type == "cuda" and y.device.type == "cuda"
    # The batch holds the examples the sampler chose, binarized: 0/1 where the grey image is
    # strictly inside (0, 1), equal to it where it is exactly 0 or 1.
    order = loader.sampler.order(0)[: x.shape[0]]
    grey = dm.train_split.images[order].to(CUDA)
    assert torch.equal(y, dm.train_split.labels[order].to(CUDA))
    assert torch.all((x == 0) | (x == 1)) and torch.all(x[grey == 0] == 0)
    assert torch.all(x[grey == 1] == 1)
    again = [(x.clone(), y.clone()) for x, y in dm.train_dataloader()]  # same seed, same epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))


@needs_cuda
def test_a_gpu_run_with_the_data_on_the_gpu_validates_like_one_with_host_batches(tmp_path):
    import lightning.pytorch as pl

    from vae.models import GaussianVAE

    elbos = []
    for on_device in (False, True):
        torch.manual_seed(0)
        model = GaussianVAE((1, 8, 8), hidden_dims=[32], latent_dim=4, data_levels=2)
        trainer = pl.Trainer(
            accelerator="gpu",
            devices=1,
            max_epochs=1,
            limit_train_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
        )
        dm = DigitsDataModule(binarize="static", seed=0, on_device=on_device)
        trainer.validate(model, datamodule=dm, verbose=False)
        elbos.append(trainer.callback_metrics["val/elbo"])
    assert torch.allclose(elbos[0], elbos[1], rtol=1e-6)
