"""Convolutional encoder and decoder for images of any shape (C, H, W).

One stride-2 3x3 conv per entry of ``hidden_dims`` halves each side (rounding up), so
28x28 with ``[32, 64]`` ends at 7x7 and 8x8 with ``[32, 64]`` at 2x2. The decoder mirrors
the encoder with transposed convs sized from the same ``spatial_sizes`` sequence, so it
returns exactly (C, H, W). See ``vae.nn.blocks`` for the size arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vae.nn.blocks import downsample_conv, make_activation, spatial_sizes, upsample_conv
from vae.nn.validation import (
    check_images,
    check_latent,
    image_shape,
    positive_int,
    positive_int_list,
)


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> stride-2 convs with activation -> flatten -> linear (B, out_dim).

    Args:
        input_shape: image shape ``(C, H, W)``; any H, W >= 1.
        hidden_dims: channels of each stride-2 conv, input side first, e.g. ``[32, 64]``.
            Raises ``ValueError`` if the image is too small for that many layers.
        out_dim: width of the linear output layer. ``None`` drops it: the output is then
            the flattened, activated feature map of width ``hidden_dims[-1] * h * w``, which
            is what ``GaussianEncoder`` puts its mu/logvar heads on.
        activation: a name from ``vae.nn.blocks.ACTIVATIONS``.

    ``self.out_dim`` is the width of the output features; ``self.feature_shape`` is the
    shape ``(hidden_dims[-1], h, w)`` of the last feature map.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_dims: Sequence[int],
        out_dim: int | None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.input_shape = image_shape(input_shape, "ConvEncoder", "input_shape")
        hidden_dims = positive_int_list(hidden_dims, "ConvEncoder", "hidden_dims")
        height, width = spatial_sizes(self.input_shape[1:], len(hidden_dims))[-1]
        layers: list[nn.Module] = []
        channels = self.input_shape[0]
        for hidden in hidden_dims:
            layers += [downsample_conv(channels, hidden), make_activation(activation)]
            channels = hidden
        layers.append(nn.Flatten())
        self.feature_shape = (channels, height, width)
        features = math.prod(self.feature_shape)
        if out_dim is not None:
            out_dim = positive_int(out_dim, "ConvEncoder", "out_dim")
            layers.append(nn.Linear(features, out_dim))
            features = out_dim
        self.out_dim = features
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.input_shape)
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, latent_dim) -> linear -> (hidden_dims[-1], h, w) -> transposed convs -> (B, C, H, W).

    ``hidden_dims`` is given in ENCODER order, e.g. ``[32, 64]``: the decoder starts from a
    64-channel map of the encoder's final size (h, w), goes 64 -> 32 -> C channels with one
    stride-2 transposed conv per entry, and ends at exactly (H, W). The output has no final
    activation (Bernoulli logits or Gaussian means).
    """

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        output_shape: Sequence[int],
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.latent_dim = positive_int(latent_dim, "ConvDecoder", "latent_dim")
        hidden_dims = positive_int_list(hidden_dims, "ConvDecoder", "hidden_dims")
        self.output_shape = image_shape(output_shape, "ConvDecoder", "output_shape")
        sizes = spatial_sizes(self.output_shape[1:], len(hidden_dims))
        start_shape = (hidden_dims[-1], *sizes[-1])
        layers: list[nn.Module] = [
            nn.Linear(self.latent_dim, math.prod(start_shape)),
            nn.Unflatten(1, start_shape),
            make_activation(activation),
        ]
        # Walk the encoder backwards: layer i of the encoder took sizes[i] (channels
        # hidden_dims[i-1], or C for i = 0) to sizes[i+1] (channels hidden_dims[i]).
        out_channels = [self.output_shape[0], *hidden_dims[:-1]]
        for i in reversed(range(len(hidden_dims))):
            layers.append(upsample_conv(hidden_dims[i], out_channels[i], sizes[i + 1], sizes[i]))
            if i > 0:
                layers.append(make_activation(activation))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Map z of shape (..., latent_dim) to (..., C, H, W); extra leading dims (e.g.
        importance samples) are kept."""
        batch_shape = check_latent(z, self.latent_dim)
        return self.net(z.reshape(-1, self.latent_dim)).reshape(*batch_shape, *self.output_shape)
