"""Fully connected encoder and decoder for images of any shape (C, H, W)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vae.nn.blocks import make_activation
from vae.nn.validation import (
    check_images,
    check_latent,
    image_shape,
    positive_int,
    positive_int_list,
)


class MLPEncoder(nn.Module):
    """Flatten (B, C, H, W) -> hidden layers with activation -> linear (B, out_dim).

    Args:
        input_shape: image shape ``(C, H, W)``.
        hidden_dims: widths of the hidden layers, input side first, e.g. ``[512, 256]``.
            May be empty for a single linear map.
        out_dim: width of the linear output layer. ``None`` drops that layer: the output
            is then the activated last hidden layer, of width ``hidden_dims[-1]``, which is
            what ``GaussianEncoder`` puts its mu/logvar heads on.
        activation: a name from ``vae.nn.blocks.ACTIVATIONS``.

    ``self.out_dim`` is the width of the output features in either case.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_dims: Sequence[int],
        out_dim: int | None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.input_shape = image_shape(input_shape, "MLPEncoder", "input_shape")
        hidden_dims = positive_int_list(
            hidden_dims, "MLPEncoder", "hidden_dims", allow_empty=out_dim is not None
        )
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(self.input_shape)
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), make_activation(activation)]
            width = hidden
        if out_dim is not None:
            out_dim = positive_int(out_dim, "MLPEncoder", "out_dim")
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.out_dim = width
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.input_shape)
        return self.net(x)


class MLPDecoder(nn.Module):
    """(B, latent_dim) -> hidden layers with activation -> linear -> (B, C, H, W) raw outputs.

    ``hidden_dims`` is given in ENCODER order, e.g. ``[512, 256]``; the decoder mirrors it
    (latent -> 256 -> 512 -> C*H*W), so one config list describes both networks. The
    output has no final activation: it is read as Bernoulli logits or Gaussian means by
    the likelihood.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        output_shape: Sequence[int],
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.latent_dim = positive_int(latent_dim, "MLPDecoder", "latent_dim")
        hidden_dims = positive_int_list(hidden_dims, "MLPDecoder", "hidden_dims", allow_empty=True)
        self.output_shape = image_shape(output_shape, "MLPDecoder", "output_shape")
        layers: list[nn.Module] = []
        width = self.latent_dim
        for hidden in reversed(hidden_dims):
            layers += [nn.Linear(width, hidden), make_activation(activation)]
            width = hidden
        layers += [
            nn.Linear(width, math.prod(self.output_shape)),
            nn.Unflatten(1, self.output_shape),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Map z of shape (..., latent_dim) to (..., C, H, W); extra leading dims (e.g.
        importance samples) are kept."""
        batch_shape = check_latent(z, self.latent_dim)
        return self.net(z.reshape(-1, self.latent_dim)).reshape(*batch_shape, *self.output_shape)
