"""VQ-VAE test metrics: perplexity and codebook usage over the whole split, reconstruction MSE,
and the prior's bits per dimension; checked on the real models and on a hand-made code stream."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vae.eval.suite import vqvae_metrics, vqvae_prior_metrics
from vae.losses import perplexity
from vae.models import VQVAE, VQVAEPrior
from vae.training import tags


class FixedCodes(nn.Module):
    """A VQ-VAE stand-in that uses code ``x[:, 0, 0, 0]`` at every one of its 4 positions."""

    num_codes = 8
    rate = 4 * math.log(8)

    def forward(self, x):
        codes = x[:, 0, 0, 0].long()
        indices = codes.view(-1, 1, 1).expand(-1, 2, 2)
        return torch.zeros_like(x), SimpleNamespace(indices=indices)

    def decoder_mean(self, params):
        return params + 0.5

    def reconstruction_nll(self, params, x):
        return (x - 0.5).square().flatten(1).sum(1)

    def bits_per_dim(self, nll):  # a probability of 4 pixels (LatentVariableModule.bits_per_dim)
        return nll / (4 * math.log(2))


def test_perplexity_is_over_the_whole_split_not_a_mean_over_batches():
    # Batch 1 uses only code 0, batch 2 only code 3: each batch alone has perplexity 1.
    first = torch.zeros(5, 1, 2, 2)
    second = torch.full((5, 1, 2, 2), 3.0)
    metrics = vqvae_metrics(FixedCodes(), [first, second])
    assert metrics[tags.TEST_PERPLEXITY] == pytest.approx(2.0)
    assert metrics[tags.TEST_CODEBOOK_USAGE] == pytest.approx(2 / 8)
    assert metrics[tags.TEST_NUM_EXAMPLES] == 10
    # (x - 0.5)^2 averaged over pixels and examples: 0.25 and 6.25 for the two halves.
    assert metrics[tags.TEST_RECON_MSE] == pytest.approx((0.25 + 6.25) / 2)
    assert metrics[tags.TEST_RECON] == pytest.approx(4 * (0.25 + 6.25) / 2)
    assert metrics[tags.TEST_KL] == pytest.approx(4 * math.log(8))
    assert metrics[tags.TEST_BITS_PER_DIM] == pytest.approx(
        (metrics[tags.TEST_RECON] + 4 * math.log(8)) / (4 * math.log(2))
    )


@pytest.fixture(scope="module")
def vqvae():
    torch.manual_seed(0)
    return VQVAE(
        image_shape=(1, 8, 8), hidden_dims=[16, 16], code_dim=8, num_codes=16, data_levels=2
    ).eval()


def test_real_vqvae_matches_its_own_validation_histogram(vqvae):
    images = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1)).round()
    batches = list(images.split(16))
    metrics = vqvae_metrics(vqvae, batches)
    vqvae.val_code_usage.reset()
    with torch.no_grad():
        terms = [vqvae.compute_terms(x, step=0)[1] for x in batches]
    counts = vqvae.val_code_usage.compute().counts
    assert metrics[tags.TEST_PERPLEXITY] == pytest.approx(float(perplexity(counts)), rel=1e-9)
    assert metrics[tags.TEST_CODEBOOK_USAGE] == pytest.approx(float((counts > 0).double().mean()))
    weights = [x.shape[0] / 50 for x in batches]
    mse = sum(float(t["mse"]) * w for t, w in zip(terms, weights, strict=True))
    recon = sum(float(t["recon"]) * w for t, w in zip(terms, weights, strict=True))
    assert metrics[tags.TEST_RECON_MSE] == pytest.approx(mse, rel=1e-5)
    assert metrics[tags.TEST_RECON] == pytest.approx(recon, rel=1e-5)


def test_prior_bits_per_dim_come_from_the_prior_nll(vqvae):
    with pytest.warns(UserWarning, match="vqvae_ckpt is null"):
        model = VQVAEPrior(
            image_shape=(1, 8, 8),
            vqvae={"hidden_dims": [16, 16], "code_dim": 8, "num_codes": 16},
            dim=16,
            depth=1,
            heads=2,
            data_levels=2,
        ).eval()
    images = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(2)).round()
    metrics = vqvae_prior_metrics(model, images.split(8))
    with torch.no_grad():
        kl = float(model.prior.nll(model.codes(images).indices).mean())
    assert metrics[tags.TEST_KL] == pytest.approx(kl, rel=1e-5)
    recon = metrics[tags.TEST_RECON]
    assert metrics[tags.TEST_ELBO] == pytest.approx(-(recon + kl), rel=1e-6)
    assert metrics[tags.TEST_BITS_PER_DIM] == pytest.approx((recon + kl) / (64 * math.log(2)))
    # The VQ-VAE's own code statistics come along.
    assert 0 < metrics[tags.TEST_CODEBOOK_USAGE] <= 1 and metrics[tags.TEST_PERPLEXITY] >= 1
