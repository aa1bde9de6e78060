"""Gaussian encoder head: any feature network -> (mu, logvar) of q(z | x) = N(mu, diag(exp(logvar)))."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vae.nn.validation import positive_int


class GaussianEncoder(nn.Module):
    """Wrap a feature network ``body`` with two plain linear heads giving ``(mu, logvar)``.

    ``body`` maps x to features of shape (B, feature_dim). Then ``mu = W_mu f + b_mu`` and
    ``logvar = W_s f + b_s``, each (B, latent_dim). logvar is the natural log of the
    variance, unconstrained: no activation, so the posterior variance exp(logvar) can take
    any positive value.

    Args:
        body: feature network, e.g. ``MLPEncoder(..., out_dim=None)``.
        feature_dim: width of the body's output.
        latent_dim: dimension of z.
        logvar_clamp: optional ``(low, high)``. When given, logvar is passed through
            ``torch.clamp(logvar, low, high)``, which guards exp(logvar) against overflow
            but has ZERO gradient outside the range. Off by default (``None``) so that
            gradients are never cut silently.
    """

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        latent_dim: int,
        logvar_clamp: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(body, nn.Module):
            raise ValueError(
                f"GaussianEncoder: argument 'body' must be a torch.nn.Module, "
                f"got {type(body).__name__}."
            )
        self.feature_dim = positive_int(feature_dim, "GaussianEncoder", "feature_dim")
        self.latent_dim = positive_int(latent_dim, "GaussianEncoder", "latent_dim")
        self.logvar_clamp = _check_clamp(logvar_clamp)
        self.body = body
        self.mu_head = nn.Linear(self.feature_dim, self.latent_dim)
        self.logvar_head = nn.Linear(self.feature_dim, self.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"body output must have shape (batch, feature_dim={self.feature_dim}), got "
                f"{tuple(features.shape)}; pass the body's output width as feature_dim."
            )
        mu = self.mu_head(features)
        logvar = self.logvar_head(features)
        if self.logvar_clamp is not None:
            logvar = torch.clamp(logvar, *self.logvar_clamp)
        return mu, logvar

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, logvar_clamp={self.logvar_clamp}"


def _check_clamp(logvar_clamp: Sequence[float] | None) -> tuple[float, float] | None:
    if logvar_clamp is None:
        return None
    try:
        low, high = (float(v) for v in logvar_clamp)
    except (TypeError, ValueError):
        raise ValueError(
            f"GaussianEncoder: argument 'logvar_clamp' must be None or a pair (low, high) of "
            f"numbers such as (-10, 10), got {logvar_clamp!r}."
        ) from None
    if math.isnan(low) or math.isnan(high) or not low < high:
        raise ValueError(
            f"GaussianEncoder: argument 'logvar_clamp' must satisfy low < high, "
            f"got ({low}, {high})."
        )
    return low, high
