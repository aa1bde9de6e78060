"""Binarization of [0, 1] intensities, for a Bernoulli likelihood that is a real likelihood.

The Bernoulli log-likelihood ``x log p + (1 - x) log(1 - p)`` is a normalised log-probability
only when ``x`` is 0 or 1. On grey values it is a cross-entropy, not a likelihood, and its
numbers cannot be compared with published NLLs. The literature uses two schemes:

- ``static``: every pixel is sampled once, ``x_bin ~ Bernoulli(x)``, with a fixed seed, and
  the same binary images are reused for the whole run (as in the fixed "binarized MNIST").
  We sample (not threshold at 0.5): thresholding changes the data distribution.
- ``dynamic``: training images are re-sampled from ``Bernoulli(x)`` every time a batch is
  drawn, which acts as data augmentation. Validation and test images are binarized once
  with a fixed seed, so their numbers are comparable across epochs and runs.
- ``none``: the [0, 1] intensities are used as they are (for a Gaussian likelihood).
"""

import torch

BINARIZE_MODES = ("none", "static", "dynamic")


def check_binarize_mode(binarize: str) -> str:
    """Return ``binarize`` if it is one of ``BINARIZE_MODES``, else raise ``ValueError``."""
    if binarize not in BINARIZE_MODES:
        raise ValueError(
            f"data.binarize must be one of {', '.join(BINARIZE_MODES)}; got {binarize!r}. "
            "Use 'dynamic' or 'static' with a Bernoulli likelihood, 'none' with a Gaussian one."
        )
    return binarize


def sample_binary(intensities: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw ``Bernoulli(intensities)`` elementwise; the result has the input's dtype and is 0 or 1.

    ``intensities`` must lie in [0, 1]; ``generator`` must live on the tensor's device
    (``None`` uses torch's global generator). ``u < p`` with ``u ~ Uniform[0, 1)`` is 1 with
    probability ``p`` (never for p = 0, always for p = 1), and is faster than
    ``torch.bernoulli`` on CPU.
    """
    uniform = torch.rand(
        intensities.shape, generator=generator, device=intensities.device, dtype=intensities.dtype
    )
    return (uniform < intensities).to(intensities.dtype)
