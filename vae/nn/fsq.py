"""Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple"): a quantizer with an implicit codebook, a drop-in for ``VectorQuantizer``.

Each of the d = len(levels) channels of z is bounded to an interval that holds exactly L_i
integers and rounded to the nearest one, so the codes are the grid of prod_i L_i points:

    half_i  = (L_i - 1) (1 - eps) / 2,    offset_i = 0.5 if L_i is even else 0,
    shift_i = atanh(offset_i / half_i),
    bound_i(z)  = half_i tanh(z + shift_i) - offset_i     in (-half_i - offset_i, half_i - offset_i)
    k_i     = round(bound_i(z)) + floor(L_i / 2)          in {0, ..., L_i - 1}
    code_i  = (k_i - floor(L_i / 2)) / floor(L_i / 2)     in [-1, 1]

(eps = 1e-3, as in the paper). For odd L the bounded value lies inside (-(L-1)/2, (L-1)/2) and
rounds to the L integers -(L-1)/2 ... (L-1)/2; for even L the half-level offset moves the
interval to inside (-L/2, L/2 - 1), which rounds to the L integers -L/2 ... L/2 - 1. The shift
puts bound(0) at exactly 0 (the paper's code writes tan for atanh; with x = offset / half the
two differ by x^5 / 15 + O(x^7), and either keeps the L values). For L = 2 (offset > half)
no shift can do that:
the shift is 0 and z = 0 lies on the boundary of the two levels. ``round`` is torch's, halves
to even, as jnp.round.

**Straight-through.** The value is the rounded code; the gradient skips the rounding, so

    d code_i / d z_i = bound_i'(z) / floor(L_i / 2) = half_i (1 - tanh^2(z_i + shift_i)) / floor(L_i / 2)

and the Jacobian is diagonal (:func:`fsq_gradient` gives that diagonal, the tests compare it
with autograd).

**Implicit index.** With the mixed radix basis b_i = prod_{j<i} L_j (b_0 = 1) a code's index is
sum_i k_i b_i, a bijection from the grid onto {0, ..., prod L - 1}; :meth:`lookup` inverts it
with k_i = (index // b_i) mod L_i. So the code histogram, ``val/perplexity``,
``val/codebook_usage`` and the transformer prior over indices work as with a learned codebook.

**No auxiliary losses.** There is no codebook to learn and the bound keeps z from drifting,
so the codebook and commitment terms of ``QuantizerOutput`` are zeros, ``loss`` is zero, no
code can die (``dead_codes`` is 0) and none is restarted (``num_restarted`` is 0).

**Level sets** recommended by the paper (its table of level sets) for about 2^8 ... 2^16 codes:

    2^8:  [8, 6, 5]          240 codes        2^12: [7, 5, 5, 5, 5]    4,375 codes
    2^10: [8, 5, 5, 5]     1,000 codes        2^14: [8, 8, 8, 6, 5]   15,360 codes
    2^16: [8, 8, 8, 5, 5, 5]  64,000 codes

Any list of integers >= 2 works (L = 1 would be a channel that carries nothing).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vae.losses.vq import perplexity
from vae.nn.quantizer import (
    QuantizerOutput,
    StraightThrough,
    all_reduce_sum,
    flatten_codes,
    unflatten_codes,
)

# (1 - eps) shrinks the bound so that tanh's open interval never reaches a rounding boundary.
BOUND_EPS = 1e-3
RECOMMENDED_LEVELS = {
    8: (8, 6, 5),
    10: (8, 5, 5, 5),
    12: (7, 5, 5, 5, 5),
    14: (8, 8, 8, 6, 5),
    16: (8, 8, 8, 5, 5, 5),
}
"""The paper's recommended level sets, keyed by the log2 of the code count they aim at."""


def check_levels(levels: object) -> tuple[int, ...]:
    """``levels`` as a tuple of ints >= 2, else ``ValueError`` naming ``levels``."""
    message = (
        "FiniteScalarQuantizer: argument 'levels' must be a non-empty list of integers >= 2 "
        f"(e.g. [8, 5, 5, 5] for 1,000 codes), got {levels!r}."
    )
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(message)
    checked = []
    for level in levels:
        if isinstance(level, bool):
            raise ValueError(message)
        try:
            number = operator.index(level)
        except TypeError:
            raise ValueError(message) from None
        if number < 2:
            raise ValueError(message)
        checked.append(number)
    return tuple(checked)


def _per_channel(levels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(half, offset, shift, half_width) of the module docstring, float32, one per channel."""
    half = (levels - 1) * (1 - BOUND_EPS) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    # L = 2 has offset > half: no shift puts bound(0) at a level, and 0 is left as the boundary.
    shift = torch.where(offset < half, torch.atanh(offset / half), 0.0)
    half_width = torch.div(levels, 2, rounding_mode="floor")
    return half, offset, shift, half_width


def fsq_bound(z: Tensor, levels: Tensor) -> Tensor:
    """half tanh(z + shift) - offset along the last axis of ``z`` (..., d): values whose
    rounding takes exactly L_i values in channel i."""
    half, offset, shift, _ = _per_channel(levels)
    return half * torch.tanh(z + shift) - offset


def fsq_gradient(z: Tensor, levels: Tensor) -> Tensor:
    """The diagonal of d code / d z under the straight-through estimator, same shape as ``z``
    (..., d): half (1 - tanh^2(z + shift)) / floor(L / 2)."""
    half, _, shift, half_width = _per_channel(levels)
    return half * (1 - torch.tanh(z + shift).square()) / half_width


def mixed_radix_basis(levels: Tensor) -> Tensor:
    """b_i = prod_{j<i} L_j as int64 (b_0 = 1): the place values of the implicit index."""
    return torch.cat([levels.new_ones(1), torch.cumprod(levels[:-1], 0)]).long()


class FiniteScalarQuantizer(nn.Module):
    """Round each bounded channel to L_i levels; see the module docstring for the maths.

    Args:
        levels: L_i per channel, each >= 2 (default [8, 5, 5, 5]: 1,000 codes of 4 channels).
        code_dim: the encoder's output channels, when the caller knows them: must equal
            len(levels) (a check, nothing is projected).
        num_codes: the code count the caller expects: must equal prod(levels) (a check).

    ``num_codes`` (= prod(levels)) and ``code_dim`` (= d) are attributes, as on
    ``VectorQuantizer``; ``num_restarted`` is a zero counter (no code is ever restarted).
    """

    def __init__(
        self,
        levels: Sequence[int] = RECOMMENDED_LEVELS[10],
        code_dim: int | None = None,
        num_codes: int | None = None,
    ) -> None:
        super().__init__()
        self.levels = check_levels(levels)
        self.code_dim = len(self.levels)
        self.num_codes = math.prod(self.levels)
        asked = {"code_dim": (code_dim, self.code_dim), "num_codes": (num_codes, self.num_codes)}
        wrong = {
            name: pair for name, pair in asked.items() if pair[0] is not None and pair[0] != pair[1]
        }
        if wrong:
            given = " and ".join(f"{name}={pair[0]}" for name, pair in wrong.items())
            needed = " and ".join(f"{name}={pair[1]}" for name, pair in wrong.items())
            verb = "were" if len(wrong) > 1 else "was"
            raise ValueError(
                f"FiniteScalarQuantizer: levels={list(self.levels)} make {self.num_codes} codes of "
                f"{self.code_dim} channels, but {given} {verb} asked; set {needed} (or other "
                "levels)."
            )
        level_tensor = torch.tensor(self.levels, dtype=torch.float32)
        # Not in the state dict: they follow from `levels`, which the config (hparams) holds.
        self.register_buffer("level_values", level_tensor, persistent=False)
        self.register_buffer("basis", mixed_radix_basis(level_tensor), persistent=False)
        self.register_buffer("num_restarted", torch.zeros((), dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, num_codes={self.num_codes}, code_dim={self.code_dim}"

    # --- codes <-> indices ------------------------------------------------------------------
    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Implicit index sum_i k_i b_i of grid codes (..., d) in [-1, 1], as int64 (...)."""
        half_width = _per_channel(self.level_values)[3]
        digits = torch.round(codes * half_width + half_width).long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Grid codes (..., d) float32 of int64 ``indices`` (...): k_i = (index // b_i) mod L_i."""
        half_width = _per_channel(self.level_values)[3]
        digits = torch.div(indices.unsqueeze(-1), self.basis, rounding_mode="floor")
        digits = torch.remainder(digits, self.level_values.long())
        return (digits.float() - half_width) / half_width

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes for integer ``indices`` (B, *spatial) as channels-first (B, d, *spatial)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}.")
        if indices.numel() and bool((indices.min() < 0) | (indices.max() >= self.num_codes)):
            raise ValueError(
                f"indices must lie in [0, {self.num_codes}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]."
            )
        return self.indices_to_codes(indices.long()).movedim(-1, 1)

    # --- forward -------------------------------------------------------------------------------
    def _flatten(self, z: Tensor) -> Tensor:
        return flatten_codes(
            z, self.code_dim, "the encoder's output channels must equal len(levels)."
        )

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channels-first ``z`` (B, d, *spatial); see ``QuantizerOutput``.

        ``loss``, ``codebook_loss`` and ``commitment_loss`` are zeros (FSQ has neither term),
        and so is ``dead_codes``. ``perplexity`` is over all processes when training distributed.
        """
        flat_in = self._flatten(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = flat_in.float()
            bounded = fsq_bound(flat, self.level_values)
            half_width = _per_channel(self.level_values)[3]
            codes = torch.round(bounded).detach() / half_width
            # value: the rounded code; gradient: that of bounded / half_width.
            straight_through = StraightThrough.apply(bounded / half_width, codes)
            indices = self.codes_to_indices(codes)
            counts = torch.bincount(indices, minlength=self.num_codes).float()
            global_counts = all_reduce_sum(counts.clone()) if self.training else counts
            batch_perplexity = perplexity(global_counts, validate=False).float()
            zero = flat.new_zeros(())

        return QuantizerOutput(
            quantized=unflatten_codes(straight_through, z),
            indices=indices.reshape(z.shape[0], *z.shape[2:]),
            loss=zero,
            codebook_loss=zero,
            commitment_loss=zero,
            perplexity=batch_perplexity,
            counts=counts,
            dead_codes=torch.zeros((), dtype=torch.long, device=z.device),
        )
