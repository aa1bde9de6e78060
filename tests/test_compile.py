"""`model.compile=true` (issue 19): the networks are compiled in place, so checkpoints keep the
plain modules' keys and load into an uncompiled model, and the numbers do not change."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vae.data import DigitsDataModule
from vae.models import GaussianVAE


def tiny() -> GaussianVAE:
    torch.manual_seed(0)
    return GaussianVAE((1, 8, 8), hidden_dims=[32], latent_dim=4, data_levels=2)


def test_compiled_networks_keep_their_keys_numbers_and_checkpoints(tmp_path):
    plain, compiled = tiny(), tiny()
    compiled.compile_networks()
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(16, 1, 8, 8).round()
    for module in (plain, compiled):
        module.eval()
    with torch.no_grad():
        assert torch.allclose(compiled.encode(x)[0], plain.encode(x)[0], atol=1e-5)
        z = torch.randn(16, 4)
        assert torch.allclose(compiled.decode(z), plain.decode(z), atol=1e-5)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
    )
    trainer.fit(compiled, datamodule=DigitsDataModule(binarize="static", seed=0))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not [key for key in saved if "_orig_mod" in key]
    fresh = tiny()
    fresh.load_state_dict(saved)  # strict: the plain model takes the compiled run's weights
    assert torch.equal(fresh.decoder.state_dict()["net.0.weight"], saved["decoder.net.0.weight"])


def test_fused_adam_takes_the_steps_of_the_plain_one():
    plain, fused = tiny(), tiny()
    x = torch.rand(32, 1, 8, 8).round()
    optimisers = [
        torch.optim.Adam(plain.parameters(), lr=1e-2),
        torch.optim.Adam(fused.parameters(), lr=1e-2, fused=True),
    ]
    for _ in range(5):
        for model, optimiser in zip((plain, fused), optimisers, strict=True):
            torch.manual_seed(1)
            optimiser.zero_grad()
            model.compute_terms(x, step=0)[0].backward()
            optimiser.step()
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
