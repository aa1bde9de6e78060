"""Vector-quantisation terms (van den Oord et al. 2017, eq. 3), pure torch.

With z = z_e(x) the encoder output at one latent position, e = e_{k(z)} its nearest code and
sg the stop-gradient:

    codebook   = ||sg(z) - e||^2     moves the codes towards the encoder outputs
    commitment = ||z - sg(e)||^2     keeps the encoder close to its codes
    vq_loss    = codebook + beta * commitment

beta weighs the **commitment** term (0.25 in the paper); the codebook term is unweighted. Both
distances are squared Euclidean, summed over code dimensions and latent positions and averaged
over the batch: "per example", like every other term of this project, but in squared latent
units rather than nats.

The rate of a VQ-VAE with a uniform prior over K codes is latent positions x log K nats per
example: q(z|x) is one-hot, so KL(q || uniform) = log K at each position.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vae.losses.kl import entropy
from vae.losses.validation import in_unit


def _check_pair(z: Tensor, quantized: Tensor) -> int:
    if z.shape != quantized.shape:
        raise ValueError(
            f"z and quantized must have the same shape, got {tuple(z.shape)} and "
            f"{tuple(quantized.shape)}."
        )
    if z.dim() == 0 or z.shape[0] == 0:
        raise ValueError(f"z must have a non-empty batch dimension first, got {tuple(z.shape)}.")
    return z.shape[0]


def codebook_loss(z: Tensor, quantized: Tensor) -> Tensor:
    """||sg(z) - e||^2 per example (scalar): its gradient reaches only ``quantized``.

    Args:
        z: encoder outputs, (B, ...) (any layout; every non-batch element is summed).
        quantized: the selected codes e, same shape as ``z`` (not yet straight-through).
    """
    batch = _check_pair(z, quantized)
    return (z.detach() - quantized).pow(2).sum() / batch


def commitment_loss(z: Tensor, quantized: Tensor) -> Tensor:
    """||z - sg(e)||^2 per example (scalar), before beta: its gradient reaches only ``z``."""
    batch = _check_pair(z, quantized)
    return (z - quantized.detach()).pow(2).sum() / batch


def vq_losses(z: Tensor, quantized: Tensor) -> tuple[Tensor, Tensor]:
    """(codebook, commitment) per example, see :func:`codebook_loss` and :func:`commitment_loss`.

    The two values are equal; they differ only in where their gradients go. The caller
    applies beta to the commitment term.
    """
    return codebook_loss(z, quantized), commitment_loss(z, quantized)


def _check_counts(counts: Tensor, validate: bool) -> Tensor:
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"counts must be a 1-D histogram over the codes, got shape {tuple(counts.shape)}."
        )
    counts = counts.double()
    if not validate:
        return counts
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("counts must be finite and non-negative (how often each code was used).")
    if float(counts.sum()) <= 0:
        raise ValueError(
            "counts must contain at least one use; perplexity of no codes is undefined."
        )
    return counts


def perplexity(counts: Tensor, *, validate: bool = True) -> Tensor:
    """exp(H(p)) of the code histogram ``counts`` (K,), p = counts / sum(counts).

    It is the effective number of codes in use: 1 when a single code takes every position, K
    for uniform use. Computed in float64 from counts, so a histogram accumulated over a whole
    epoch (not one batch) gives the epoch's perplexity. ``validate=False`` skips the value
    checks, which cost a host synchronisation, for use inside a training step.
    """
    counts = _check_counts(counts, validate)
    probabilities = counts / counts.sum()
    return torch.exp(entropy(probabilities, validate=False))


def codebook_usage(counts: Tensor, *, validate: bool = True) -> Tensor:
    """Fraction of the K codes used at least once in the histogram ``counts`` (K,)."""
    counts = _check_counts(counts, validate)
    return (counts > 0).double().mean()


def uniform_prior_rate(num_positions: int, num_codes: int, *, unit: str = "nats") -> float:
    """KL(one-hot q || uniform over ``num_codes``) summed over ``num_positions``: n log K nats
    (n log2 K bits with ``unit="bits"``)."""
    if num_positions <= 0 or num_codes <= 0:
        raise ValueError(
            f"num_positions and num_codes must be positive, got {num_positions} and {num_codes}."
        )
    return in_unit("uniform_prior_rate", num_positions * math.log(num_codes), unit)
