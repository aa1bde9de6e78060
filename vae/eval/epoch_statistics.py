"""Statistics of a whole epoch (or split) as ``torchmetrics`` metrics: active units, KL per
latent dimension, code usage, and the decomposition of the KL (:class:`KLDecompositionMetric`,
which keeps the posteriors themselves rather than sums, since q(z) needs all of them).

Each is a sum over examples, so each metric keeps running sums registered with
``add_state(..., dist_reduce_fx="sum")``: under DDP, ``compute()`` all-gathers and adds them
over the processes (torchmetrics does this whenever a process group is initialised), and the
result is the statistic of the union of the processes' data. No hand-written reduction.

Conventions shared by the three:

* Sums of real values are float64 and counts int64. The states keep these dtypes when the
  module holding them is cast (``.half()``, ``.to(torch.bfloat16)``, as Lightning's
  ``"bf16-true"`` precision does): a variance of 0.01 or a histogram of 10^6 positions does not
  survive a 16-bit accumulator.
* Updates are out of place (``state = state + batch``), so a metric reset inside
  ``torch.inference_mode()`` (Lightning's validation loop) can still be updated outside it.
* An empty batch adds nothing. ``compute()`` with no example at all *on any process* raises
  ``ValueError`` (after the sync, so every process raises together instead of one waiting in a
  collective); torchmetrics also warns when a process itself saw no ``update``. Under DDP the
  metric is then left holding the synced sums: ``reset()`` it before using it again.
* ``compute()`` is collective under DDP: call it on every process, not only on rank zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from vae.eval.active_units import ACTIVE_UNIT_THRESHOLD, count_active_units
from vae.losses import codebook_usage, perplexity
from vae.losses.decomposition import KLDecomposition, kl_decomposition

__all__ = [
    "ActiveUnits",
    "CodeUsage",
    "CodeUsageResult",
    "KLDecompositionMetric",
    "KLPerDimension",
]


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _check_rows(name: str, values: Tensor, width: int) -> Tensor:
    """``values`` as a detached (B, width) float64 tensor (B may be 0)."""
    if values.dim() != 2 or values.shape[1] != width:
        raise ValueError(f"{name} must have shape (batch, {width}), got {tuple(values.shape)}.")
    if not values.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {values.dtype}.")
    return values.detach().to(torch.float64)


class _SumMetric(Metric):
    """Base of the epoch statistics: sum states whose dtype no module cast can change."""

    full_state_update = False  # batch states merge by the same sums: forward() needs no replay
    is_differentiable = False
    higher_is_better = None

    def _add_sum(self, name: str, default: Tensor) -> None:
        self.add_state(name, default=default, dist_reduce_fx="sum", persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state=()) -> Metric:
        # torchmetrics already ignores .half()/.float()/.double(), but not .to(dtype), which is
        # what Lightning's "16-true"/"bf16-true" precision calls on the whole LightningModule.
        # The states are moved to the new device only.
        this = super()._apply(fn, exclude_state=(*exclude_state, *self._defaults))
        for name, default in this._defaults.items():
            if name in exclude_state:
                continue
            this._defaults[name] = default.to(this.device)
            setattr(this, name, getattr(this, name).to(this.device))
        return this

    def set_dtype(self, dst_type: Any) -> Metric:
        raise TypeError(
            f"{type(self).__name__} keeps float64 sums and int64 counts; its dtype is fixed."
        )


class ActiveUnits(_SumMetric):
    """Number of active latent units (Burda, Grosse & Salakhutdinov 2016, section 5.2).

    Unit d is active when its posterior mean moves with the input::

        A_d = Var_x( E_{q(z|x)}[z_d] ) = Var_x( mu_d(x) ) > threshold   (0.01 by default)

    over every example seen since the last ``reset()`` (all processes). The variance is the
    population one (divisor N), in squared latent units, from float64 sums::

        Var_x(mu_d) = S2_d / N - (S1_d / N)^2,   S1_d = sum_x mu_d(x),  S2_d = sum_x mu_d(x)^2

    clamped at 0. Against a prior N(0, I) the raw moments are already moments about the prior
    mean; the cancellation error is ~1e-16 * mean^2 / variance relatively, i.e. 1e-10 for a
    mean of 100 and a variance of 0.01, below the float32 rounding of mu itself.

    ``update(mu)``: posterior means (B, latent_dim). ``compute()``: the number of active units,
    an int64 scalar tensor. ``variance()``: Var_x(mu_d) per unit, float64 (latent_dim,).

    Args:
        latent_dim: D, fixed so that every process holds states of one shape.
        threshold: Burda et al.'s 0.01 by default; a unit is active strictly above it.
        kwargs: torchmetrics' ``Metric`` options (``sync_on_compute``, ``process_group``...).
    """

    def __init__(
        self, latent_dim: int, threshold: float = ACTIVE_UNIT_THRESHOLD, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.latent_dim = _check_size("latent_dim", latent_dim)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (a variance), got {threshold}.")
        self.threshold = float(threshold)
        self._add_sum("count", torch.zeros((), dtype=torch.int64))
        self._add_sum("mean_sum", torch.zeros(latent_dim, dtype=torch.float64))
        self._add_sum("square_sum", torch.zeros(latent_dim, dtype=torch.float64))

    def update(self, mu: Tensor) -> None:
        """Add a batch of posterior means E_q[z | x], shape (B, latent_dim)."""
        mu = _check_rows("mu", mu, self.latent_dim)
        self.count = self.count + mu.shape[0]
        self.mean_sum = self.mean_sum + mu.sum(0)
        self.square_sum = self.square_sum + mu.square().sum(0)

    def _variance(self) -> Tensor:
        if int(self.count) == 0:
            raise ValueError(
                "ActiveUnits has seen no posterior means on any process; call update(mu) first."
            )
        mean = self.mean_sum / self.count
        return (self.square_sum / self.count - mean.square()).clamp_min(0.0)

    def compute(self) -> Tensor:
        """Number of units with Var_x(mu_d) > threshold, int64 scalar."""
        variance = self._variance()
        return torch.tensor(count_active_units(variance, self.threshold), device=variance.device)

    def variance(self) -> Tensor:
        """Var_x(E_q[z_d]) per unit, float64 (latent_dim,), over all processes like compute()."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            process_group=self.process_group,
            should_sync=self.sync_on_compute,
            distributed_available=self.distributed_available_fn,
        ):
            return self._variance().clone()


class KLPerDimension(_SumMetric):
    """Mean KL of each latent dimension over the examples, nats per example::

        KL_d = (1 / N) sum_x KL( q(z_d | x) || p(z_d) )

    summed over processes. ``KL_d.sum()`` is the epoch's mean KL term, and a dimension with
    KL_d ~ 0 has collapsed to the prior (compare :class:`ActiveUnits`).

    ``update(kl)``: per-example KL of each dimension, (B, latent_dim) nats, e.g.
    ``vae.losses.gaussian_kl(mu, logvar)``; not a batch mean, so that batches of any size weigh
    by their examples. ``compute()``: (latent_dim,) float64, nats.

    Args:
        latent_dim: D, fixed so that every process holds states of one shape.
        kwargs: torchmetrics' ``Metric`` options.
    """

    def __init__(self, latent_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.latent_dim = _check_size("latent_dim", latent_dim)
        self._add_sum("count", torch.zeros((), dtype=torch.int64))
        self._add_sum("kl_sum", torch.zeros(latent_dim, dtype=torch.float64))

    def update(self, kl: Tensor) -> None:
        """Add the per-example KL of a batch, (B, latent_dim) nats."""
        kl = _check_rows("kl", kl, self.latent_dim)
        self.count = self.count + kl.shape[0]
        self.kl_sum = self.kl_sum + kl.sum(0)

    def compute(self) -> Tensor:
        """Mean KL per dimension, float64 (latent_dim,), nats per example."""
        if int(self.count) == 0:
            raise ValueError(
                "KLPerDimension has seen no examples on any process; call update(kl) first."
            )
        return self.kl_sum / self.count


class CodeUsageResult(NamedTuple):
    """What :class:`CodeUsage` computes."""

    counts: Tensor
    """(K,) int64: how often each code was chosen, over all positions and processes."""
    perplexity: Tensor
    """float64 scalar: exp(H(counts / N)), the effective number of codes in use, in [1, K]."""
    usage: Tensor
    """float64 scalar: the fraction of the K codes chosen at least once, in [1/K, 1]."""


class CodeUsage(_SumMetric):
    """Histogram of the chosen codes of a vector quantizer, and its perplexity and usage.

    With n_k the number of latent positions (over all examples and processes) whose nearest
    code is k, N = sum_k n_k and p_k = n_k / N::

        perplexity = exp( -sum_k p_k log p_k )      (0 log 0 = 0)   effective codes, 1..K
        usage      = #{k : n_k > 0} / K                             fraction of codes used

    computed by ``vae.losses.perplexity`` and ``codebook_usage`` from the histogram of the whole
    epoch: not a mean of per-batch perplexities, which understates the codes in use.

    ``update(indices)``: code indices, an integer tensor of any shape, each in [0, K).
    ``compute()``: a :class:`CodeUsageResult` (counts, perplexity, usage).

    Args:
        num_codes: K, the codebook size.
        kwargs: torchmetrics' ``Metric`` options.
    """

    def __init__(self, num_codes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_codes = _check_size("num_codes", num_codes)
        self._add_sum("counts", torch.zeros(num_codes, dtype=torch.int64))

    def update(self, indices: Tensor) -> None:
        """Add the chosen codes of a batch: integer indices in [0, num_codes), any shape."""
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}.")
        flat = indices.detach().flatten()
        if flat.numel() == 0:
            return
        low, high = torch.aminmax(flat)
        if bool((low < 0) | (high >= self.num_codes)):
            raise ValueError(
                f"indices must lie in [0, {self.num_codes}), got values in "
                f"[{int(low)}, {int(high)}]."
            )
        self.counts = self.counts + torch.bincount(flat, minlength=self.num_codes)

    def compute(self) -> CodeUsageResult:
        """(counts, perplexity, usage) of the histogram over all processes."""
        if int(self.counts.sum()) == 0:
            raise ValueError(
                "CodeUsage has seen no code indices on any process; call update(indices) first."
            )
        counts = self.counts.clone()
        return CodeUsageResult(counts, perplexity(counts), codebook_usage(counts))


class KLDecompositionMetric(Metric):
    """Mutual information, total correlation and dimension-wise KL of a whole epoch's posteriors
    (``vae.losses.decomposition``), with q(z) the aggregate posterior of every example seen
    since the last ``reset()`` on every process (``dist_reduce_fx="cat"``: all-gathered).

    ``update(mu, logvar, kl=None)``: a batch's posterior parameters, (B, latent_dim) each, and
    for a prior other than N(0, I) each example's KL (B,), whose epoch mean then replaces the
    closed form (``kl_decomposition(..., kl=)``).
    ``compute()``: a :class:`~vae.losses.decomposition.KLDecomposition` (float64, nats).
    The draws come from a generator seeded with ``seed``, so that every process computes the
    same numbers and an epoch's estimate does not depend on the training RNG (nor moves it).

    Args:
        latent_dim: D.
        num_points: draws averaged over (a seeded random subset of the examples); q(z) always
            mixes all of them. The cost is num_points x N x D: 1,000 draws against 5,000
            validation examples take ~0.3 s on 2 CPU cores. None: every example.
        seed: of the subset and the draws.
        kwargs: torchmetrics' ``Metric`` options.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self, latent_dim: int, num_points: int | None = 1000, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.latent_dim = _check_size("latent_dim", latent_dim)
        self.num_points = None if num_points is None else _check_size("num_points", num_points)
        self.seed = int(seed)
        self.add_state("mu", default=[], dist_reduce_fx="cat", persistent=False)
        self.add_state("logvar", default=[], dist_reduce_fx="cat", persistent=False)
        self.add_state("kl", default=[], dist_reduce_fx="cat", persistent=False)

    def update(self, mu: Tensor, logvar: Tensor, kl: Tensor | None = None) -> None:
        """Add a batch of posteriors q(z|x) = N(mu, diag exp(logvar)), (B, latent_dim) each,
        and optionally their KLs against the model's prior, (B,) nats (all batches or none)."""
        self.mu.append(_check_rows("mu", mu, self.latent_dim).float())
        self.logvar.append(_check_rows("logvar", logvar, self.latent_dim).float())
        if kl is not None:
            self.kl.append(_check_rows("kl", kl.reshape(-1, 1), 1)[:, 0])

    def compute(self) -> KLDecomposition:
        mu, logvar = self.mu, self.logvar
        mu = torch.cat(mu) if isinstance(mu, list) and mu else mu
        logvar = torch.cat(logvar) if isinstance(logvar, list) and logvar else logvar
        if isinstance(mu, list) or mu.shape[0] < 2:
            raise ValueError(
                "KLDecompositionMetric needs the posteriors of at least 2 examples over all "
                "processes; call update(mu, logvar) first."
            )
        kl = self.kl
        kl = torch.cat(kl) if isinstance(kl, list) and kl else kl
        if isinstance(kl, list) or kl.numel() == 0:  # (an empty list synced across processes)
            kl = None  # N(0, I): the closed form
        elif kl.shape[0] != mu.shape[0]:
            raise ValueError("KLDecompositionMetric: give kl with every update(), or with none.")
        else:
            kl = kl.mean()
        generator = torch.Generator().manual_seed(self.seed)
        return kl_decomposition(mu, logvar, num_points=self.num_points, generator=generator, kl=kl)
