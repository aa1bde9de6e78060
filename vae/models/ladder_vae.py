"""Two-level ladder VAE (Sønderby et al. 2016): z1 (bottom, next to x) and z2 (top).

Generative model, top-down::

    p(z2) = N(0, I),   p(z1|z2) = N(mu_p(z2), diag exp(logvar_p(z2))),   p(x|z1) from ``likelihood``

Inference: a deterministic bottom-up pass d1 = f1(x), d2 = f2(d1) gives (mu_hat_i, logvar_hat_i)
at each level; then, top-down, the same way as the generative model::

    q(z2|x)     = N(mu_hat2, diag exp(logvar_hat2))
    q(z1|x, z2) = the precision-weighted product of N(mu_hat1, var_hat1) and p(z1|z2):
                  1/var_q = 1/var_hat1 + 1/var_p,   mu_q = var_q (mu_hat1/var_hat1 + mu_p/var_p)

The KL splits per layer, each in closed form given the sampled z2 (nats per example)::

    KL2 = KL(q(z2|x) || N(0, I))                        (exact)
    KL1 = KL(q(z1|x, z2) || p(z1|z2))                   (exact for the drawn z2)
    kl  = KL1 + KL2,   elbo = -(recon + kl),   loss = recon + regulariser(KL per dimension)

so E_q[KL1] is one draw of the KL of layer 1, like the reconstruction term. The regulariser
sees the (B, D1 + D2) per-dimension KL, layer 1's dimensions first: ``model.free_bits`` is
then lambda per dimension of each layer. Logged besides the Gaussian VAE's terms:
``kl_layer1`` and ``kl_layer2`` (they add up to ``kl``), and per epoch the histograms
``kl_per_dim_layer1`` and ``kl_per_dim_layer2``.

``encode(x)`` (for active units and reconstructions) returns the "mean path": q(z1|x, z2) at
z2 = mu_hat2, then q(z2|x), concatenated, (B, D1 + D2) each. Since q(z1|x, z2) depends on
the drawn z2, q(z|x) is not that diagonal Gaussian, so the KL decomposition (mutual
information, total correlation) is not reported (``reports_kl_decomposition = False``), and
``vae-eval`` uses ``importance_sample`` for the likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vae.eval.epoch_statistics import ActiveUnits, KLPerDimension
from vae.eval.nll import (
    diagonal_gaussian_log_density,
    reconstruction_nll_of_draws,
    standard_normal_log_density,
)
from vae.losses import compute_elbo, gaussian_kl
from vae.models.gaussian_vae import GaussianVAE
from vae.nn import GaussianEncoder, make_activation

_LOG_2PI = math.log(2.0 * math.pi)


def precision_weighted(
    mu_a: torch.Tensor, logvar_a: torch.Tensor, mu_b: torch.Tensor, logvar_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) of the normalised product N(mu_a, var_a) N(mu_b, var_b), elementwise:

        logvar = -log(1/var_a + 1/var_b) = -logaddexp(-logvar_a, -logvar_b)
        mu     = w mu_a + (1 - w) mu_b,   w = var_b / (var_a + var_b) = sigmoid(logvar_b - logvar_a)

    written in log space so that no variance is divided by or overflows."""
    weight_a = torch.sigmoid(logvar_b - logvar_a)
    return weight_a * mu_a + (1 - weight_a) * mu_b, -torch.logaddexp(-logvar_a, -logvar_b)


def _mlp(in_dim: int, hidden_dims: Sequence[int]) -> tuple[nn.Sequential, int]:
    """Linear + ReLU layers of the given widths, and the output width."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), make_activation("relu")]
        in_dim = width
    return nn.Sequential(*layers), in_dim


def _positive_ints(key: str, value, length: int | None) -> list[int]:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if (
        values is None
        or (length is not None and len(values) != length)
        or not values
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        size = f"{length} " if length else ""
        raise ValueError(f"model.{key} must be a list of {size}positive integers, got {value!r}")
    return values


class LadderVAE(GaussianVAE):
    """The Gaussian VAE's keys (``conf/model/ladder_vae.yaml``; its ``encoder``, ``decoder``,
    ``arch`` and ``hidden_dims`` are the x <-> z1 networks), with ``latent_dims`` for
    ``latent_dim``, plus:

    Args:
        latent_dims: [D1, D2], the sizes of z1 (bottom) and z2 (top) (``model.latent_dims``).
        top_hidden_dims: hidden widths of f2 (d1 -> d2, input side first) and, mirrored, of
            the top-down network z2 -> p(z1|z2) (``model.top_hidden_dims``); may be empty.
    """

    reports_kl_decomposition = False  # see the module docstring

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dims: Sequence[int] = (16, 8),
        top_hidden_dims: Sequence[int] = (128,),
        **kwargs,
    ):
        if "latent_dim" in kwargs:
            raise ValueError("model.latent_dim is not a ladder VAE key: set model.latent_dims")
        latent_dims = _positive_ints("latent_dims", latent_dims, 2)
        top_hidden_dims = (
            _positive_ints("top_hidden_dims", top_hidden_dims, None) if top_hidden_dims else []
        )
        super().__init__(image_shape, latent_dim=latent_dims[0], **kwargs)
        if not isinstance(self.encoder, GaussianEncoder):
            raise ValueError(
                "model.encoder must build a vae.nn.GaussianEncoder (e.g. vae.nn.build_encoder): "
                f"the ladder reads its features d1, got {type(self.encoder).__name__}"
            )
        self.latent_dims = tuple(latent_dims)
        bottom, top = latent_dims
        body, width = _mlp(self.encoder.feature_dim, top_hidden_dims)
        self.upper_encoder = GaussianEncoder(body, width, top)  # d1 -> (mu_hat2, logvar_hat2)
        body, width = _mlp(top, top_hidden_dims[::-1])
        self.top_down = GaussianEncoder(body, width, bottom)  # z2 -> (mu_p, logvar_p) of z1
        generator = torch.Generator().manual_seed(4321)
        self.register_buffer(  # with sample_z (the noise of z1): the same val/samples each epoch
            "sample_z2", torch.randn(self.num_images, top, generator=generator), persistent=False
        )
        self.val_active_units = ActiveUnits(bottom + top)
        self.val_kl_per_dim_layers = nn.ModuleList([KLPerDimension(bottom), KLPerDimension(top)])

    # --- the two passes ---------------------------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(mu_hat1, logvar_hat1, mu_hat2, logvar_hat2): (B, D1) twice, then (B, D2) twice."""
        features = self.encoder.body(x)  # d1
        mu_hat1, logvar_hat1 = self.encoder.mu_head(features), self.encoder.logvar_head(features)
        if self.encoder.logvar_clamp is not None:
            logvar_hat1 = torch.clamp(logvar_hat1, *self.encoder.logvar_clamp)
        return mu_hat1, logvar_hat1, *self.upper_encoder(features)

    def prior_z1(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_p, logvar_p) of p(z1|z2) for z2 (..., D2): each (..., D1)."""
        mu, logvar = self.top_down(z2.reshape(-1, z2.shape[-1]))
        return mu.view(*z2.shape[:-1], -1), logvar.view(*z2.shape[:-1], -1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean path, (mu, logvar) each (B, D1 + D2): q(z1|x, z2 = mu_hat2), q(z2|x)."""
        mu_hat1, logvar_hat1, mu_hat2, logvar_hat2 = self.bottom_up(x)
        mu1, logvar1 = precision_weighted(mu_hat1, logvar_hat1, *self.prior_z1(mu_hat2))
        return torch.cat([mu1, mu_hat2], -1), torch.cat([logvar1, logvar_hat2], -1)

    def layer_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One reparameterised draw of (z2, z1) per example, top-down: (recon (B,), KL1 (B, D1),
        KL2 (B, D2)), nats; KL1 is KL(q(z1|x, z2) || p(z1|z2)) at the drawn z2."""
        mu_hat1, logvar_hat1, mu_hat2, logvar_hat2 = self.bottom_up(x)
        z2 = self.reparameterise(mu_hat2, logvar_hat2)
        mu_p, logvar_p = self.prior_z1(z2)
        mu_q, logvar_q = precision_weighted(mu_hat1, logvar_hat1, mu_p, logvar_p)
        z1 = self.reparameterise(mu_q, logvar_q)
        recon = self.reconstruction_nll(self.decode(z1), x)
        kl1 = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p, validate=False)
        kl2 = gaussian_kl(mu_hat2, logvar_hat2, validate=False)
        return recon, kl1, kl2

    def compute_terms(self, x: torch.Tensor, step: int):
        recon, kl1, kl2 = self.layer_terms(x)
        terms = compute_elbo(
            recon, torch.cat([kl1, kl2], 1), self.regulariser, step, validate=False
        )
        # The layers' batch means, and the logged kl as exactly their sum.
        kl_layer1, kl_layer2 = kl1.sum(1).mean(), kl2.sum(1).mean()
        kl = kl_layer1 + kl_layer2
        elbo = -(terms.recon + kl)
        scalars = {
            "loss": terms.loss,
            "recon": terms.recon,
            "kl": kl,
            "beta": terms.beta,
            "elbo": elbo,
            "kl_layer1": kl_layer1,
            "kl_layer2": kl_layer2,
        }
        if self.likelihood.reports_bits_per_dim:
            scalars["bits_per_dim"] = self.bits_per_dim(-elbo)
        if not self.training:
            self.val_active_units.update(self.encode(x)[0].detach())
            for metric, layer_kl in zip(self.val_kl_per_dim_layers, (kl1, kl2), strict=True):
                metric.update(layer_kl.detach())
        return terms.loss, scalars

    def val_scalar_names(self):
        return (*super().val_scalar_names(), "kl_layer1", "kl_layer2")

    def importance_sample(
        self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log w, -log p(x|z1)) at num_samples fresh top-down draws z2 ~ q(z2|x),
        z1 ~ q(z1|x, z2), each (B, S), nats (``vae.eval.nll``)::

            log w = log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x, z2) - log q(z2|x)
        """
        mu_hat1, logvar_hat1, mu_hat2, logvar_hat2 = self.bottom_up(x)
        shape = (x.shape[0], num_samples)

        def draw(mu, logvar):  # z and log q(z) = -1/2 sum (log 2 pi + logvar + eps^2), exact
            eps = torch.randn(
                (*shape, mu.shape[-1]), generator=generator, device=mu.device, dtype=mu.dtype
            )
            z = mu + torch.exp(0.5 * logvar) * eps
            return z, -0.5 * (_LOG_2PI + logvar + eps.square()).sum(-1)

        z2, log_q2 = draw(mu_hat2.unsqueeze(1), logvar_hat2.unsqueeze(1))
        mu_p, logvar_p = self.prior_z1(z2)
        mu_q, logvar_q = precision_weighted(
            mu_hat1.unsqueeze(1), logvar_hat1.unsqueeze(1), mu_p, logvar_p
        )
        z1, log_q1 = draw(mu_q, logvar_q)
        recon = reconstruction_nll_of_draws(self, self.decode(z1), x)
        log_prior = diagonal_gaussian_log_density(z1, mu_p, logvar_p) + standard_normal_log_density(
            z2
        )
        return log_prior - log_q1 - log_q2 - recon, recon

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder means at the mean path's z1 (``encode``)."""
        return self.likelihood.mean(self.decode(self.encode(x)[0][:, : self.latent_dims[0]]))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Decoder means at z1 ~ p(z1|z2), z2 ~ N(0, I)."""
        if num_samples <= self.sample_z2.shape[0]:  # the fixed draws of val/samples
            z2, eps1 = self.sample_z2[:num_samples], self.sample_z[:num_samples]
        else:
            z2 = torch.randn(num_samples, self.latent_dims[1], device=self.device)
            eps1 = torch.randn(num_samples, self.latent_dims[0], device=self.device)
        mu_p, logvar_p = self.prior_z1(z2)
        return self.likelihood.mean(self.decode(mu_p + torch.exp(0.5 * logvar_p) * eps1))

    # --- statistics of the whole validation epoch ------------------------------------------
    def log_epoch_statistics(self) -> None:
        """``val/active_units`` (of both layers' mean path) and the histograms
        ``val/kl_per_dim_layer1`` and ``val/kl_per_dim_layer2``."""
        self.log_val_epoch_scalar("active_units", self.val_active_units.compute())
        for layer, metric in enumerate(self.val_kl_per_dim_layers, start=1):
            self.log_val_histogram(f"kl_per_dim_layer{layer}", metric.compute())
