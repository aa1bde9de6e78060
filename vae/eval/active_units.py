"""Active latent units (Burda, Grosse & Salakhutdinov 2016, section 5.2).

Unit d is *active* when its posterior mean moves with the input:

    A_d = Cov_x( E_{q(z|x)}[z_d] ) = Var_x( mu_d(x) ) > 0.01,

the variance taken over the examples of a split. An inactive unit has collapsed to the prior:
whatever x is, q(z_d|x) says the same thing, so the unit carries no information about x (its
KL is then typically ~0 nats as well).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["ACTIVE_UNIT_THRESHOLD", "PosteriorMeanStatistics", "active_units", "count_active_units"]

ACTIVE_UNIT_THRESHOLD = 0.01
"""Burda et al.'s threshold on Var_x(E_q[z_d]), in squared latent units."""


class PosteriorMeanStatistics:
    """Running per-dimension mean and variance over examples of the posterior means mu(x).

    Sums are kept in float64 so that a variance of ~0.01 is not lost to cancellation against a
    mean of order 1 over 10^4+ examples. Feed batches with :meth:`update`; read :attr:`variance`.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sum: Tensor | None = None
        self._sum_sq: Tensor | None = None

    def update(self, mu: Tensor) -> None:
        """Add a batch of posterior means, shape (B, D)."""
        if mu.dim() != 2 or mu.shape[0] == 0:
            raise ValueError(f"mu must have shape (batch, latent_dim), got {tuple(mu.shape)}.")
        mu = mu.detach().double()
        if self._sum is None:
            self._sum = torch.zeros(mu.shape[1], dtype=torch.float64, device=mu.device)
            self._sum_sq = torch.zeros_like(self._sum)
        elif mu.shape[1] != self._sum.shape[0]:
            raise ValueError(
                f"mu has {mu.shape[1]} latent dimensions, earlier batches had {self._sum.shape[0]}."
            )
        self.count += mu.shape[0]
        self._sum += mu.sum(0)
        self._sum_sq += mu.square().sum(0)

    def reduce(self, sum_over_processes: Callable[[Tensor], Tensor]) -> None:
        """Combine with the other processes' statistics (DDP): ``sum_over_processes`` sums a
        tensor across processes, e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``."""
        if self._sum is None:
            raise ValueError("no posterior means were added; call update(mu) with a batch first.")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self._sum.device)
        packed = sum_over_processes(torch.cat([self._sum, self._sum_sq, count]))
        dims = self._sum.shape[0]
        self._sum, self._sum_sq = packed[:dims], packed[dims : 2 * dims]
        self.count = int(packed[-1])

    @property
    def variance(self) -> Tensor:
        """Var_x(mu_d(x)) per dimension (population variance, divisor N), float64 (D,)."""
        if self._sum is None:
            raise ValueError("no posterior means were added; call update(mu) with a batch first.")
        mean = self._sum / self.count
        return (self._sum_sq / self.count - mean.square()).clamp_min(0.0)


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
