"""Active latent units (Burda, Grosse & Salakhutdinov 2016, section 5.2).

Unit d is *active* when its posterior mean moves with the input:

    A_d = Cov_x( E_{q(z|x)}[z_d] ) = Var_x( mu_d(x) ) > 0.01,

the variance taken over the examples of a split. An inactive unit has collapsed to the prior:
whatever x is, q(z_d|x) says the same thing, so the unit carries no information about x (its
KL is then typically ~0 nats as well).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["ACTIVE_UNIT_THRESHOLD", "active_units", "count_active_units"]

ACTIVE_UNIT_THRESHOLD = 0.01
"""Burda et al.'s threshold on Var_x(E_q[z_d]), in squared latent units."""


def count_active_units(variance: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of dimensions whose Var_x(E_q[z_d]) exceeds ``threshold`` (strictly)."""
    if variance.dim() != 1:
        raise ValueError(
            f"variance must be 1-D (one value per latent unit), got {tuple(variance.shape)}."
        )
    return int((variance > threshold).sum())


@torch.no_grad()
def active_units(
    model, batches: Iterable[Tensor], threshold: float = ACTIVE_UNIT_THRESHOLD
) -> tuple[int, Tensor]:
    """(number of active units, Var_x(E_q[z_d]) per unit, float64) of ``model`` over ``batches``.

    Statistics of this process's batches only, even under DDP: no collective is entered, so
    one process may call it alone. Raises ``ValueError`` when ``batches`` is empty.

    Args:
        model: anything with ``encode(x) -> (mu, logvar)``.
        batches: iterable of image batches (B, ...) on the model's device.
        threshold: Burda et al.'s 0.01 by default.
    """
    # Imported here: epoch_statistics takes its threshold and count from this module.
    from vae.eval.epoch_statistics import ActiveUnits

    statistics = None
    for x in batches:
        mu, _ = model.encode(x)
        if statistics is None:  # the latent size is known from the first batch
            statistics = ActiveUnits(mu.shape[-1], threshold, sync_on_compute=False).to(mu.device)
        statistics.update(mu)
    if statistics is None:
        raise ValueError("batches is empty: there are no posterior means to take a variance of.")
    return int(statistics.compute()), statistics.variance()
