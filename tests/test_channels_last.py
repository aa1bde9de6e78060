"""`model.channels_last=true` (issue 19): conv weights and image batches in NHWC layout, the same
numbers as the default layout, and checkpoints that load into a model in either layout."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint

from experiments.train import CONFIG_DIR
from vae.data import DigitsDataModule
from vae.models import VQVAE, GaussianVAE
from vae.training.config import ConfigError, validate_config

NHWC = torch.channels_last


def conv_vae() -> GaussianVAE:
    torch.manual_seed(0)
    return GaussianVAE((1, 8, 8), arch="conv", hidden_dims=[8, 16], latent_dim=4, data_levels=2)


def fit(model, tmp_path, steps: int = 6) -> tuple[pl.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoint],
    )
    trainer.fit(model, datamodule=DigitsDataModule(binarize="static", seed=0))
    return trainer, checkpoint


def conv_weights(model) -> list[torch.Tensor]:
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]


def test_channels_last_converts_conv_weights_and_activations():
    model = conv_vae()
    model.use_channels_last()
    weights = conv_weights(model)
    assert weights and all(w.is_contiguous(memory_format=NHWC) for w in weights)
    assert not all(w.is_contiguous() for w in weights)  # the layout really changed
    # Images in the default layout come out of the first convolution in NHWC: the batches
    # need no conversion of their own.
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv(torch.rand(4, 1, 8, 8)).is_contiguous(memory_format=NHWC)


def test_channels_last_training_gives_the_numbers_of_the_default_layout(tmp_path):
    plain, nhwc = conv_vae(), conv_vae()
    nhwc.use_channels_last()
    trainer_plain, _ = fit(plain, tmp_path / "plain")
    trainer_nhwc, checkpoint = fit(nhwc, tmp_path / "nhwc")
    for name in ("val/elbo", "val/kl", "val/recon"):
        a, b = trainer_plain.callback_metrics[name], trainer_nhwc.callback_metrics[name]
        assert torch.allclose(a, b, rtol=1e-5), (name, a, b)
    for p, q in zip(plain.parameters(), nhwc.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)
    assert all(w.is_contiguous(memory_format=NHWC) for w in conv_weights(nhwc))

    # The checkpoint of the NHWC run loads, strictly, into a model in the default layout and
    # decodes exactly what the NHWC model decodes.
    fresh = conv_vae()
    fresh.load_state_dict(torch.load(checkpoint.last_model_path, weights_only=False)["state_dict"])
    z = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(fresh.eval().decode(z), nhwc.eval().decode(z), atol=1e-6)


def test_vqvae_codes_do_not_depend_on_the_layout():
    torch.manual_seed(0)
    plain = VQVAE((1, 8, 8), hidden_dims=[8, 16], code_dim=4, num_codes=8, res_hidden=8)
    nhwc = VQVAE((1, 8, 8), hidden_dims=[8, 16], code_dim=4, num_codes=8, res_hidden=8)
    nhwc.load_state_dict(plain.state_dict())
    nhwc.use_channels_last()
    x = torch.rand(6, 1, 8, 8)
    plain.eval(), nhwc.eval()
    with torch.no_grad():
        out_plain = plain(x)
        out_nhwc = nhwc(x.contiguous(memory_format=NHWC))
    assert torch.equal(out_plain[1].indices, out_nhwc[1].indices)
    assert torch.allclose(out_plain[0], out_nhwc[0], atol=1e-5)


def test_channels_last_is_refused_for_a_model_without_conv_layers():
    mlp = GaussianVAE((1, 8, 8), hidden_dims=[16], latent_dim=2, data_levels=2)
    with pytest.raises(ValueError, match=r"model.channels_last=true .*model.arch=conv"):
        mlp.use_channels_last()


@pytest.mark.parametrize("key", ["model.channels_last", "model.compile"])
def test_run_option_must_be_a_boolean(key):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"{key}=yes"])
    with pytest.raises(ConfigError, match=rf"{key}='yes' is invalid: expected true or false"):
        validate_config(cfg)
