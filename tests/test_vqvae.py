"""VQ-VAE and its prior as modules: terms, units, epoch histogram, checkpoints, the prior's maths."""

from __future__ import annotations

import math
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir

from vae.losses import perplexity
from vae.models import VQVAE, GaussianVAE, VQVAEPrior
from vae.models.vqvae_prior import load_frozen_vqvae
from vae.nn import CodePrior
from vae.training import tags
from vae.training.checkpoints import CheckpointError
from vae.training.config import ConfigError, validate_config

IMAGE = (1, 8, 8)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def small_vqvae(**kwargs) -> VQVAE:
    torch.manual_seed(0)
    arguments = {
        "hidden_dims": [8, 16],
        "code_dim": 4,
        "num_codes": 16,
        "res_hidden": 8,
        "data_levels": 2,  # binary images: the Bernoulli NLL is a probability, with bits/dim
        **kwargs,
    }
    return VQVAE(IMAGE, **arguments)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *IMAGE, generator=torch.Generator().manual_seed(seed)).round()


def save_lightning_like(model, path) -> str:
    """The parts of a Lightning checkpoint that loading reads."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "model_class": type(model).__qualname__,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return str(path)


# --- VQ-VAE --------------------------------------------------------------------------------------


def test_terms_cover_the_contract_tags_with_the_right_units():
    model = small_vqvae().train()
    x = images()
    loss, terms = model.compute_terms(x, step=0)
    names = {tags.tag("train", n) for n in model.train_scalar_names()}
    assert set(tags.VQVAE_TRAIN_SCALARS) == names
    assert model.grid_shape == (2, 2)
    # train/kl is the rate of a uniform prior: positions x log K nats.
    assert terms["kl"].item() == pytest.approx(4 * math.log(16))
    # recon is the Bernoulli NLL summed over pixels, averaged over the batch.
    model.eval()  # (a training step moves the EMA codebook between the two calls)
    loss, terms = model.compute_terms(x, step=0)
    params, _ = model(x)
    expected_recon = (
        torch.nn.functional.binary_cross_entropy_with_logits(params, x, reduction="sum")
        / x.shape[0]
    )
    assert terms["recon"].item() == pytest.approx(expected_recon.item(), rel=1e-5)
    assert loss.item() == pytest.approx(terms["recon"].item() + terms["vq_loss"].item(), rel=1e-6)
    assert terms["elbo"].item() == pytest.approx(-(terms["recon"] + terms["kl"]).item())
    assert terms["bits_per_dim"].item() == pytest.approx(
        -terms["elbo"].item() / (64 * math.log(2)), rel=1e-6
    )
    assert 1.0 <= terms["perplexity"].item() <= 16.0


def test_one_backward_reaches_encoder_decoder_and_not_the_ema_codebook():
    model = small_vqvae(ema=True)
    loss, _ = model.compute_terms(images(), step=0)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
    assert "quantizer.codebook" not in dict(model.named_parameters())
    gradient_model = small_vqvae(ema=False)
    gradient_model.compute_terms(images(), step=0)[0].backward()
    assert gradient_model.quantizer.codebook.grad is not None


def test_validation_histogram_accumulates_over_the_whole_epoch():
    model = small_vqvae().eval()
    batches = [images(5, seed) for seed in range(3)]
    model.on_validation_epoch_start()
    expected = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        for x in batches:
            _, terms = model.compute_terms(x, step=0)
            assert "mse" in terms
            indices = model.encode_indices(x)
            expected += torch.bincount(indices.reshape(-1), minlength=16).double()
    counts = model.val_code_usage.compute().counts
    assert torch.equal(counts.double(), expected)
    assert counts.sum().item() == 3 * 5 * 4
    assert perplexity(counts).item() >= 1.0


def test_reconstruct_equals_decoding_the_codes():
    model = small_vqvae().eval()
    x = images()
    torch.testing.assert_close(model.reconstruct(x), model.decode_indices(model.encode_indices(x)))
    assert model.sample(4) is None  # no learned prior in this stage


def test_mse_is_per_pixel_between_the_decoder_mean_and_x():
    model = small_vqvae().eval()
    x = images()
    _, terms = model.compute_terms(x, step=0)
    expected = (model.reconstruct(x) - x).pow(2).mean()
    assert terms["mse"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_latent_dim_is_an_alias_of_code_dim():
    assert small_vqvae(code_dim=None, latent_dim=6).quantizer.code_dim == 6
    assert small_vqvae(code_dim=6, latent_dim=6).code_dim == 6
    with pytest.raises(ValueError, match="model.latent_dim=5 and model.code_dim=6"):
        small_vqvae(code_dim=6, latent_dim=5)


def test_mlp_arch_is_rejected_by_name():
    with pytest.raises(ValueError, match="model.arch='mlp'"):
        small_vqvae(arch="mlp")


def test_quantizer_state_travels_in_the_state_dict():
    model = small_vqvae(ema=True).train()
    model.compute_terms(images(), step=0)
    state = model.state_dict()
    for key in ("codebook", "ema_counts", "ema_embed_sum", "steps_since_used", "num_restarted"):
        assert f"quantizer.{key}" in state
    fresh = small_vqvae(ema=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.quantizer.codebook, model.quantizer.codebook)


# --- the prior network ---------------------------------------------------------------------------


def test_code_prior_is_causal_in_raster_order():
    torch.manual_seed(1)
    prior = CodePrior(num_codes=5, grid_shape=(2, 3), dim=16, depth=2, heads=2, dropout=0.0).eval()
    codes = torch.randint(0, 5, (1, 2, 3))
    base = prior(codes).reshape(1, 5, 6)
    for t in range(6):
        changed = codes.clone().reshape(1, 6)
        changed[0, t:] = (changed[0, t:] + 1) % 5
        logits = prior(changed.reshape(1, 2, 3)).reshape(1, 5, 6)
        # Positions <= t see only codes < t, which did not change.
        torch.testing.assert_close(logits[..., : t + 1], base[..., : t + 1])
        if t < 5:
            assert not torch.allclose(logits[..., t + 1 :], base[..., t + 1 :])


def test_code_prior_nll_is_the_summed_cross_entropy():
    torch.manual_seed(2)
    prior = CodePrior(num_codes=7, grid_shape=(2, 2), dim=16, depth=1, heads=2).eval()
    codes = torch.randint(0, 7, (3, 2, 2))
    log_probs = torch.log_softmax(prior(codes), dim=1)
    expected = -log_probs.gather(1, codes.unsqueeze(1)).reshape(3, -1).sum(1)
    torch.testing.assert_close(prior.nll(codes), expected)


def test_code_prior_learns_a_deterministic_successor_rule():
    # c_{t+1} = c_t + 1 mod K, c_1 uniform: the best NLL is log K (first code) + 0.
    torch.manual_seed(3)
    num_codes, grid = 6, (2, 3)
    prior = CodePrior(num_codes, grid, dim=32, depth=2, heads=2, dropout=0.0)
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)

    def batch(n=64):
        first = torch.randint(0, num_codes, (n, 1))
        return ((first + torch.arange(6)) % num_codes).reshape(n, *grid)

    for _ in range(100):
        loss = prior.nll(batch(32)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prior.eval()
    assert prior.nll(batch()).mean().item() < math.log(num_codes) + 0.5
    samples = prior.sample(20, generator=torch.Generator().manual_seed(0)).reshape(20, 6)
    assert bool(((samples[:, 1:] - samples[:, :-1]) % num_codes == 1).float().mean() > 0.9)


def test_code_prior_rejects_wrong_grids_and_heads():
    prior = CodePrior(4, (2, 2), dim=8, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"\(batch, 2, 2\)"):
        prior(torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="argument 'heads'"):
        CodePrior(4, (2, 2), dim=10, depth=1, heads=3)


# --- the second stage ----------------------------------------------------------------------------


def test_prior_stage_freezes_the_vqvae_and_bounds_log_likelihood(tmp_path):
    vqvae = small_vqvae(ema=True).eval()
    ckpt = save_lightning_like(vqvae, tmp_path / "vq.ckpt")
    model = VQVAEPrior(IMAGE, vqvae_ckpt=ckpt, dim=16, depth=1, heads=2, dropout=0.0, data_levels=2)
    model.train()
    assert not model.vqvae.training and not model.vqvae.quantizer.training
    torch.testing.assert_close(model.vqvae.quantizer.codebook, vqvae.quantizer.codebook)
    before = {k: v.clone() for k, v in model.vqvae.state_dict().items()}
    x = images()
    loss, terms = model.compute_terms(x, step=0)
    loss.backward()
    assert all(p.grad is None for p in model.vqvae.parameters())
    assert all(p.grad is not None for p in model.prior.parameters())
    for key, value in model.vqvae.state_dict().items():
        assert torch.equal(value, before[key]), f"training changed the frozen {key}"
    assert terms["kl"].item() == pytest.approx(
        model.prior.nll(vqvae.encode_indices(x)).mean().item(), rel=1e-5
    )
    model.eval()
    _, terms = model.compute_terms(x, step=0)
    _, vq_terms = vqvae.compute_terms(x, step=0)
    assert terms["recon"].item() == pytest.approx(vq_terms["recon"].item(), rel=1e-5)
    assert terms["elbo"].item() == pytest.approx(-(terms["recon"] + terms["kl"]).item())
    samples = model.sample(5)
    assert samples.shape == (5, *IMAGE) and 0.0 <= samples.min() and samples.max() <= 1.0
    torch.testing.assert_close(model.sample(5), samples)  # a fixed stream for val/samples


def test_prior_stage_refuses_the_wrong_checkpoint(tmp_path):
    gaussian = GaussianVAE(IMAGE, hidden_dims=[8], latent_dim=2)
    with pytest.raises(CheckpointError, match="holds a GaussianVAE"):
        load_frozen_vqvae(save_lightning_like(gaussian, tmp_path / "g.ckpt"), IMAGE)
    vqvae_ckpt = save_lightning_like(small_vqvae(), tmp_path / "vq.ckpt")
    with pytest.raises(CheckpointError, match=r"shape \(1, 8, 8\)"):
        load_frozen_vqvae(vqvae_ckpt, (1, 16, 16))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_frozen_vqvae(str(tmp_path / "missing.ckpt"), IMAGE)


def test_prior_stage_without_checkpoint_warns():
    with pytest.warns(UserWarning, match="model.vqvae_ckpt is null"):
        model = VQVAEPrior(
            IMAGE,
            vqvae={"hidden_dims": [8, 16], "code_dim": 4, "num_codes": 8},
            dim=16,
            depth=1,
            heads=2,
        )
    assert model.prior.num_codes == 8 and model.prior.grid_shape == (2, 2)


# --- config values -------------------------------------------------------------------------------


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.num_codes=0", "model.num_codes"),
        ("model.decay=1.0", "model.decay"),
        ("model.commitment=-1", "model.commitment"),
        ("model.dead_code_threshold=0", "model.dead_code_threshold"),
        ("model.ema=maybe", "model.ema"),
    ],
)
def test_bad_vqvae_values_fail_before_training_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(compose_config("model=vqvae", override))


def test_prior_config_checks_the_checkpoint_path(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ConfigError, match="model.vqvae_ckpt"):
        validate_config(compose_config("model=vqvae_prior", f"model.vqvae_ckpt={missing}"))
    validate_config(compose_config("model=vqvae_prior"))  # null is allowed (smoke tests)
    validate_config(compose_config("model=vqvae", "model.dead_code_threshold=null"))


@pytest.mark.parametrize(
    "likelihood, channels",
    [("discretized_logistic", 2), ("discretized_gaussian", 2), ("discretized_logistic_mixture", 9)],
)
def test_a_discretised_likelihood_gets_its_parameters_from_the_decoder(likelihood, channels):
    model = VQVAE(
        (1, 8, 8),
        hidden_dims=[16, 32],
        code_dim=8,
        num_codes=16,
        data_levels=17,
        likelihood=likelihood,
        num_mixtures=3,
    )
    x = torch.randint(0, 17, (4, 1, 8, 8)).float() / 16
    params, _ = model(x)
    assert params.shape == (4, channels, 8, 8)
    loss, terms = model.compute_terms(x, step=0)
    assert torch.isfinite(loss) and terms["recon"].item() > 0
    # a probability mass of 17-level pixels: bits/dim without any dequantisation offset
    recon = terms["recon"].item()
    assert model.bits_per_dim(recon) == pytest.approx(recon / (64 * math.log(2)))
