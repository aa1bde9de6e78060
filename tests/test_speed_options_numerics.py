"""The GPU speed options keep a short run's numbers (issue 19), measured here on the CPU: the same
model, initial weights, data and seed trained for two epochs in float32 and with each option; the
final validation ELBO must stay within the option's stated tolerance of float32's.

Tolerances (relative to |ELBO_fp32|):
* ``trainer.precision=bf16-mixed``: 0.5% between the means over training seeds 0, 1, 2. bf16
  rounds the networks' matmul inputs to 8 significant bits (2^-9 = 0.2% each), and over 46
  optimizer steps a bf16 run drifts from its float32 twin as far as another seed would: one
  seed's gap was 1.0% for the conv VAE, inside float32's own seed-to-seed range of 0.8%. What
  must not happen is a systematic shift, so the test compares means. Measured over 4 seeds:
  0.07% (conv VAE), 0.14% (MLP VAE).
* ``model.compile=true``: 1e-4 on one seed. The same float32 arithmetic, fused and reordered by
  Inductor (whose random numbers are not used: sampling stays outside the compiled networks).

``model.channels_last=true`` has its own test (tests/test_channels_last.py), to 1e-5.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from vae.data import DigitsDataModule
from vae.models import GaussianVAE

SHAPE = (1, 8, 8)


def conv_vae() -> GaussianVAE:
    return GaussianVAE(SHAPE, arch="conv", hidden_dims=[16, 32], latent_dim=4, data_levels=2)


def mlp_vae() -> GaussianVAE:
    return GaussianVAE(SHAPE, hidden_dims=[64], latent_dim=4, data_levels=2)


def short_run_elbo(
    build, precision: str = "32-true", option: str | None = None, seed: int = 0
) -> float:
    """val/elbo after 2 epochs (46 steps) on the digits; ``seed`` drives the training noise
    and the data order, the initial weights and the data are the same for every seed."""
    torch.manual_seed(0)
    model = build()
    if option == "compile":
        model.compile_networks()
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_epochs=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, binarize="static", seed=seed))
    return float(trainer.callback_metrics["val/elbo"])


@pytest.mark.parametrize("build", [conv_vae, mlp_vae], ids=["conv", "mlp"])
def test_bf16_mixed_keeps_the_mean_elbo_of_short_float32_runs(build):
    seeds = range(3)
    fp32 = sum(short_run_elbo(build, seed=seed) for seed in seeds) / len(seeds)
    bf16 = sum(short_run_elbo(build, "bf16-mixed", seed=seed) for seed in seeds) / len(seeds)
    assert abs(bf16 - fp32) <= 0.005 * abs(fp32), (fp32, bf16)


def test_compile_keeps_the_elbo_of_a_short_float32_run():
    fp32 = short_run_elbo(mlp_vae)
    compiled = short_run_elbo(mlp_vae, option="compile")
    assert abs(compiled - fp32) <= 1e-4 * abs(fp32), (fp32, compiled)
