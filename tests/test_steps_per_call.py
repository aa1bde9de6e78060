"""Several optimizer steps per Lightning training step (``train_loop.steps_per_call``).

The packing must change nothing but speed: the same batches and binarization noise, the same
optimizer steps, checks and logged steps, and the same metrics bit for bit. These tests check
the pieces (packed loading, the sample count, the checkpoint interval, the fallback rule) and
then whole runs through the real ``vae-train``.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.cli import (
    QUICK,
    last_line,
    load_events,
    read_metrics,
    run_cli,
    run_stopped_by_nan,
    scalar_series,
    without_timings,
)
from tests.test_data_batches import NUM_EXAMPLES, make
from vae.training import tags
from vae.training.callbacks import LastCheckpoint, TrainThroughput, examples_in
from vae.training.checkpoints import read_checkpoint
from vae.data import DigitsDataModule
from vae.models import GaussianVAE
from vae.models.base import batch_counting_settings


# --- packed loading ----------------------------------------------------------------------------
def _flatten(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for item in loader:
        batches += item if isinstance(item, list) else [item]
    return batches


@pytest.mark.parametrize("pack", [2, 3, 7, 10])
def test_packs_hold_the_unpacked_batches_and_noise(pack: int):
    """Digits with dynamic binarization: the batches inside the packs, in order, are the
    unpacked loader's batches, binary images included, over two epochs."""
    plain = DigitsDataModule(batch_size=64, binarize="dynamic", seed=3)
    packed = DigitsDataModule(batch_size=64, binarize="dynamic", seed=3)
    plain.setup()
    packed.setup()
    packed.pack_training_batches(pack)
    plain_loader, packed_loader = plain.train_dataloader(), packed.train_dataloader()
    for _ in range(2):  # each iter() is the next epoch
        expected, got = _flatten(plain_loader), _flatten(packed_loader)
        assert len(got) == len(expected) == -(-len(plain.train_split) // 64)
        for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
            assert torch.equal(y1, y2) and torch.equal(x1, x2)
        assert set(expected[0][0].unique().tolist()) == {0.0, 1.0}
    assert len(packed_loader) == -(-len(expected) // pack)


def test_a_pack_is_a_list_of_batches_and_the_last_may_be_short():
    dm = make(seed=0)  # 50 examples in batches of 8
    dm.pack_training_batches(3)
    packs = list(dm.train_dataloader())
    assert [[len(y) for _, y in p] for p in packs] == [[8, 8, 8], [8, 8, 8], [2]]
    assert sorted(torch.cat([y for p in packs for _, y in p]).tolist()) == list(range(NUM_EXAMPLES))
    assert [examples_in(p) for p in packs] == [24, 24, 2]
    assert examples_in(packs[0][0]) == 8  # an unpacked batch


def test_mid_epoch_position_is_counted_in_examples():
    """A checkpoint records examples done, so a resume lands on the same example whatever the
    pack size; checkpoints of earlier versions (batches done) still load."""
    dm = make(seed=0)
    dm.load_state_dict({"epoch": 0, "examples_done": 24})
    dm.pack_training_batches(3)
    resumed = [y for p in dm.train_dataloader() for _, y in p]
    full = [y for _, y in make(seed=0).train_dataloader()]
    assert torch.equal(torch.cat(resumed), torch.cat(full)[24:])
    old = make(seed=0)
    old.load_state_dict({"epoch": 0, "batches_done": 2})  # batches of 8
    assert torch.equal(torch.cat([y for _, y in old.train_dataloader()]), torch.cat(full)[16:])


def test_pack_size_is_validated():
    dm = make(seed=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="train_loop.steps_per_call"):
            dm.pack_training_batches(bad)
    model = GaussianVAE(image_shape=(1, 8, 8))
    for bad in (0, -3, 1.5, False):
        with pytest.raises(ValueError, match="train_loop.steps_per_call"):
            model.configure_loop(bad)
    model.configure_loop(4)
    assert not model.automatic_optimization and model.steps_per_call == 4
    model.configure_loop(1)
    assert model.automatic_optimization


# --- callbacks ---------------------------------------------------------------------------------
class _FakeTrainer:
    """What LastCheckpoint reads from the trainer: the step, and where it saves."""

    fast_dev_run = False
    sanity_checking = False

    def __init__(self) -> None:
        self.global_step = 0
        self.saved_at: list[int] = []

    def save_checkpoint(self, path: str) -> None:
        self.saved_at.append(self.global_step)


@pytest.mark.parametrize(
    ("steps_per_batch", "every", "expected"),
    [
        (1, 10, [10, 20, 30, 40]),  # one step per batch: at every multiple
        (8, 10, [16, 24, 32, 40]),  # at the first batch end past each multiple
        (8, 4, [8, 16, 24, 32, 40]),  # two multiples in one batch: one save
        (3, 10, [12, 21, 30, 40]),
    ],
)
def test_last_checkpoint_saves_once_past_each_multiple(steps_per_batch, every, expected):
    trainer, callback = _FakeTrainer(), LastCheckpoint("unused", every_n_train_steps=every)
    callback.on_train_start(trainer, None)
    while trainer.global_step < 40:
        trainer.global_step = min(40, trainer.global_step + steps_per_batch)
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved_at == expected


def test_last_checkpoint_does_not_save_again_at_the_resumed_step():
    trainer, callback = _FakeTrainer(), LastCheckpoint("unused", every_n_train_steps=10)
    trainer.global_step = 20  # restored from a checkpoint taken at step 20
    callback.on_train_start(trainer, None)
    trainer.global_step = 20  # a skipped first batch leaves the step where it was
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved_at == []


def test_throughput_counts_the_examples_of_a_pack():
    clock = TrainThroughput()
    pack = [(torch.zeros(8, 1, 2, 2), torch.zeros(8)), (torch.zeros(3, 1, 2, 2), torch.zeros(3))]
    clock.on_train_batch_end(None, None, None, pack, 0)
    clock.on_train_batch_end(None, None, None, pack[0], 1)
    clock.on_train_batch_end(None, None, None, [torch.zeros(5, 3), torch.zeros(5)], 2)  # collated
    assert clock.samples == 24


# --- the fallback rule -------------------------------------------------------------------------
def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
        ({"fast_dev_run": True}, "fast_dev_run"),
        ({"max_steps": 100}, "max_steps"),
        ({"overfit_batches": 1}, "overfit_batches"),
        ({"limit_train_batches": 4}, "limit_train_batches"),
        ({"val_check_interval": 10}, "val_check_interval"),
        ({"strategy": "ddp", "devices": 2}, "2 processes"),
    ],
)
def test_settings_that_count_batches_force_one_step_per_batch(kwargs, reason):
    assert any(reason in r for r in batch_counting_settings(_trainer(**kwargs)))


def test_fractions_and_defaults_allow_packs():
    assert batch_counting_settings(_trainer()) == []
    fractions = {"limit_train_batches": 0.5, "val_check_interval": 0.25, "gradient_clip_val": 0}
    assert batch_counting_settings(_trainer(**fractions)) == []


# --- whole runs --------------------------------------------------------------------------------
def _train(tmp_path: Path, *args: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = run_cli("vae-train", *args, *QUICK, cwd=tmp_path)
    return tmp_path / last_line(proc.stdout)


@pytest.mark.slow
def test_packs_of_8_train_exactly_like_one_step_per_batch(tmp_path: Path):
    """Digits (23 batches an epoch, so packs of 8 end mid-way and the last pack is short):
    the same metrics bit for bit, the same train/* steps and values, last.ckpt at step 69."""
    common = ["trainer.max_epochs=3", "seed=5", "trainer.log_every_n_steps=2"]
    one = _train(tmp_path, *common, "train_loop.steps_per_call=1")
    eight = _train(tmp_path, *common, "train_loop.steps_per_call=8")
    a, b = read_metrics(one), read_metrics(eight)
    assert without_timings(a) == without_timings(b)
    assert a["global_step"] == 3 * 23
    for tag in (tags.TRAIN_LOSS, tags.TRAIN_KL, tags.VAL_ELBO):
        series_one = scalar_series(load_events(one), tag)
        assert series_one == scalar_series(load_events(eight), tag), tag
    assert [s for s, _ in scalar_series(load_events(eight), tags.TRAIN_LOSS)][:3] == [2, 4, 6]
    checkpoint = read_checkpoint(eight / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 69 and checkpoint["steps_per_call"] == 8


@pytest.mark.slow
def test_packs_train_the_vqvae_exactly_like_one_step_per_batch(tmp_path: Path):
    """The VQ-VAE and its prior too: EMA codebook updates, dead-code restarts and dropout
    happen in the same order, so the metrics (usage, perplexity) are the same bit for bit."""
    common = ["model=vqvae", "model.num_codes=32", "trainer.max_epochs=2", "seed=3"]
    one = read_metrics(_train(tmp_path, *common, "train_loop.steps_per_call=1"))
    eight_run = _train(tmp_path, *common, "train_loop.steps_per_call=8")
    eight = read_metrics(eight_run)
    assert without_timings(one) == without_timings(eight)
    assert one["global_step"] == 2 * 23 and "val/perplexity" in one
    # Its prior (a transformer with dropout, so the global RNG is drawn from in every step).
    prior = ["model=vqvae_prior", f"model.vqvae_ckpt={eight_run}/checkpoints/last.ckpt"]
    prior += ["model.dim=32", "model.depth=1", "model.dropout=0.1", "trainer.max_epochs=1"]
    one = read_metrics(_train(tmp_path, *prior, "train_loop.steps_per_call=1"))
    eight = read_metrics(_train(tmp_path, *prior, "train_loop.steps_per_call=8"))
    assert without_timings(one) == without_timings(eight)


@pytest.mark.slow
def test_packs_fall_back_to_one_step_under_max_steps(tmp_path: Path):
    run = _train(tmp_path, "trainer.max_steps=30", "train_loop.steps_per_call=8")
    assert read_metrics(run)["global_step"] == 30  # exactly, not rounded up to a pack
    assert "train_loop.steps_per_call=8 -> 1" in (run / "train.log").read_text()
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["steps_per_call"] == 1


@pytest.mark.slow
def test_packed_run_resumed_mid_epoch_equals_a_straight_run(tmp_path: Path):
    """A packed run stopped by a NaN at step 35 keeps last.ckpt from step 31, in the middle of
    epoch 1 (its packs end at steps 31, 39, 46). Resumed from there without the NaN, it ends
    with the metrics of a straight run with one step per batch, and a gapless train curve."""
    common = ["seed=11", "trainer.log_every_n_steps=1", "trainer.max_epochs=4"]
    common += ["callbacks.last_checkpoint.every_n_train_steps=10"]
    packed = [*common, "train_loop.steps_per_call=8"]
    _, run_dir = run_stopped_by_nan(tmp_path, "kl", 35, *packed)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(checkpoint)["global_step"] == 31
    resumed = run_cli("vae-train", *packed, f"ckpt_path={checkpoint}", *QUICK, cwd=tmp_path)
    assert Path(last_line(resumed.stdout)) == run_dir.resolve()
    straight = _train(tmp_path / "straight", *common, "train_loop.steps_per_call=1")
    a, b = read_metrics(run_dir), read_metrics(straight)
    assert without_timings(a) == without_timings(b)
    steps = [s for s, _ in scalar_series(load_events(run_dir), tags.TRAIN_LOSS)]
    assert steps == list(range(1, 4 * 23 + 1))


@pytest.mark.slow
def test_packed_run_stops_at_the_nan_step_and_skips_like_one_step(tmp_path: Path):
    args = ["trainer.max_epochs=3", "train_loop.steps_per_call=8"]
    proc, run_dir = run_stopped_by_nan(tmp_path, "kl", 30, *args)
    assert "non-finite kl" in proc.stderr and "training step 30" in proc.stderr
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 23  # the epoch-end save; none holds the NaN
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())

    skip = ["trainer.max_epochs=2", "trainer_guard.inject_nan_term=recon"]
    skip += ["trainer_guard.inject_nan_step=10", "trainer_guard.skip_nonfinite=true"]
    one = read_metrics(_train(tmp_path / "a", *skip, "train_loop.steps_per_call=1"))
    eight = read_metrics(_train(tmp_path / "b", *skip, "train_loop.steps_per_call=8"))
    assert eight[tags.TRAIN_SKIPPED_BATCHES] == 1 and eight["global_step"] == 2 * 23
    assert without_timings(one) == without_timings(eight)
