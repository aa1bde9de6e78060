"""A toy VAE variant in one file: an L1 penalty on the posterior means.

    loss = recon + beta * KL + l1_weight * E_x ||mu(x)||_1        (nats per example)

The ELBO, the likelihood, the data and the training loop are the Gaussian VAE's; only the
penalty is new. Run it with ``vae-train --config-dir tests/variants/conf model=sparse_vae``.
"""

from __future__ import annotations

import torch

from vae.models import GaussianVAE


class SparseVAE(GaussianVAE):
    def __init__(self, *args, l1_weight: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.l1_weight = l1_weight

    def penalties(self, mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"l1": self.l1_weight * mu.abs().sum(-1).mean()}

    def train_scalar_names(self):
        return (*super().train_scalar_names(), "l1")

    def val_scalar_names(self):
        return (*super().val_scalar_names(), "l1")
