"""The project's Lightning callbacks, driven by a real Trainer on a tiny model."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vae.training.callbacks import TrainThroughput

TRAIN_SLEEP = 0.02  # seconds per training batch
VAL_SLEEP = 0.25  # seconds per validation epoch
BATCHES = 4  # training batches per epoch
BATCH_SIZE = 8


class SleepyModule(pl.LightningModule):
    """Training batches take at least TRAIN_SLEEP; each validation epoch at least VAL_SLEEP."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(TRAIN_SLEEP)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def on_validation_epoch_end(self) -> None:
        time.sleep(VAL_SLEEP)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 3)), batch_size=BATCH_SIZE)


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])
def test_throughput_clock_counts_training_batches_and_not_validation(val_check_interval):
    clock = TrainThroughput()
    epochs = 2
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,  # the sanity check sleeps too: it must not count either
        val_check_interval=val_check_interval,
        callbacks=[clock],
    )
    trainer.fit(
        SleepyModule(),
        train_dataloaders=_loader(BATCHES * BATCH_SIZE),
        val_dataloaders=_loader(BATCH_SIZE),
    )
    validations = epochs * round(1 / val_check_interval)
    assert clock.samples == epochs * BATCHES * BATCH_SIZE
    training_floor = epochs * BATCHES * TRAIN_SLEEP
    assert clock.seconds >= training_floor  # every training batch is on the clock
    # Validation (>= validations * VAL_SLEEP = 1 s or 2 s) is not: what is left over the
    # training floor is the Trainer's own per-batch work, a few ms a batch.
    assert clock.seconds < training_floor + 0.5 * VAL_SLEEP, (clock.seconds, validations)
    assert clock.samples_per_s == pytest.approx(clock.samples / clock.seconds)


def test_throughput_clock_ignores_a_standalone_validate():
    clock = TrainThroughput()
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[clock]
    )
    trainer.validate(SleepyModule(), dataloaders=_loader(BATCH_SIZE), verbose=False)
    assert clock.seconds == 0.0 and clock.samples == 0


@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
def test_a_sigterm_save_resumes_to_the_right_epoch(tmp_path, where):
    """SIGTERM right after an epoch's end (already saved) or between two batches: resuming from
    last.ckpt trains exactly the remaining epochs and steps. (Saving again after the epoch's
    end would store the next epoch with every example already done: a resume skipped it.)"""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from vae.data import DigitsDataModule
    from vae.models import GaussianVAE
    from vae.training.callbacks import LastCheckpoint

    steps_per_epoch = 6  # 1437 training digits in batches of 256

    class Sigterm(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if where == "mid_epoch" and trainer.global_step == steps_per_epoch + 2:
                trainer._signal_connector.received_sigterm = True

        def on_train_epoch_end(self, trainer, *args):
            if where == "epoch_end" and trainer.current_epoch == 1:
                trainer._signal_connector.received_sigterm = True

    def fit(epochs, callbacks, ckpt_path=None):
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            callbacks=[LastCheckpoint(str(tmp_path), every_n_train_steps=None), *callbacks],
            num_sanity_val_steps=0,
        )
        model = GaussianVAE(image_shape=(1, 8, 8), hidden_dims=[8], latent_dim=2)
        data = DigitsDataModule(batch_size=256, binarize="dynamic", seed=0)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    with pytest.raises(SIGTERMException):
        fit(5, [Sigterm()])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"]
    assert (
        saved == (2 if where == "epoch_end" else 1) * steps_per_epoch + (where == "mid_epoch") * 2
    )
    resumed = fit(3, [], ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 3 * steps_per_epoch and resumed.current_epoch == 3
