"""Seeded train/validation/test splits that do not depend on torch's global seed."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vae.data.seeds import SPLIT_STREAM, seeded_generator


@dataclass(frozen=True)
class ImageSplit:
    """One split held in memory: ``images`` float32 (N, C, H, W) in [0, 1], ``labels`` int64 (N,).

    ``intensities``: for binarized ``images``, the grey [0, 1] images they were drawn from
    (shown as the originals in ``val/reconstructions``); None when ``images`` are the
    intensities themselves.
    """

    images: torch.Tensor
    labels: torch.Tensor
    intensities: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(
                f"images must be float32 with shape (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 with shape ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.intensities is not None and self.intensities.shape != self.images.shape:
            raise ValueError(
                f"intensities must have the shape of images {tuple(self.images.shape)}, got "
                f"{tuple(self.intensities.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def originals(self) -> torch.Tensor:
        """The images as a person should see them: the grey intensities, also when binarized."""
        return self.images if self.intensities is None else self.intensities

    def subset(self, index: torch.Tensor) -> "ImageSplit":
        intensities = None if self.intensities is None else self.intensities[index]
        return ImageSplit(self.images[index], self.labels[index], intensities)


def split_indices(
    num_examples: int, held_out_sizes: Sequence[int], split_seed: int
) -> tuple[torch.Tensor, ...]:
    """Split ``range(num_examples)`` at random into the rest and held-out parts.

    Returns ``(rest, *held_out)``, each a sorted int64 tensor; together they cover every index
    exactly once. The permutation comes from a private generator keyed by ``split_seed``,
    so the split is the same in every run whatever the training seed is.
    """
    held_out = sum(held_out_sizes)
    if any(size < 0 for size in held_out_sizes) or held_out >= num_examples:
        raise ValueError(
            f"held-out sizes {list(held_out_sizes)} must be non-negative and leave at least one "
            f"of the {num_examples} examples for training"
        )
    order = torch.randperm(num_examples, generator=seeded_generator(SPLIT_STREAM, split_seed))
    parts, start = [], 0
    for size in held_out_sizes:
        parts.append(order[start : start + size].sort().values)
        start += size
    return (order[start:].sort().values, *parts)
