"""Encoder and decoder of the VQ-VAE (van den Oord et al. 2017, Sec. 4.1), any image shape.

The encoder maps (B, C, H, W) to a channels-first grid of continuous codes
(B, code_dim, h, w) that the quantizer snaps to its codebook; the decoder maps a grid of
that shape back to raw outputs (B, C, H, W). With one stride-2 conv per entry of
``hidden_dims`` each side shrinks to ceil(side / 2) per layer: 8x8 with ``[32, 64]`` gives a
2x2 grid, 28x28 gives 7x7 and 32x32 gives 8x8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae.nn.blocks import ResidualStack, downsample_conv, spatial_sizes, upsample_conv
from vae.nn.validation import check_images, image_shape, positive_int, positive_int_list


class VQEncoder(nn.Module):
    """(B, C, H, W) -> stride-2 convs -> residual stack -> 1x1 conv -> (B, code_dim, h, w).

    Args:
        input_shape: image shape ``(C, H, W)``.
        hidden_dims: channels of each stride-2 conv, input side first, e.g. ``[32, 64]``.
        code_dim: channels of the output grid (the codebook vector size).
        num_res_blocks: residual blocks at the lowest resolution (0 allowed).
        res_hidden: hidden channels inside each residual block.

    ``self.grid_shape`` is ``(h, w)``; ``self.latent_shape`` is ``(code_dim, h, w)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_dims: Sequence[int],
        code_dim: int,
        num_res_blocks: int = 2,
        res_hidden: int = 32,
    ) -> None:
        super().__init__()
        self.input_shape = image_shape(input_shape, "VQEncoder", "input_shape")
        hidden_dims = positive_int_list(hidden_dims, "VQEncoder", "hidden_dims")
        code_dim = positive_int(code_dim, "VQEncoder", "code_dim")
        self.grid_shape = spatial_sizes(self.input_shape[1:], len(hidden_dims))[-1]
        self.latent_shape = (code_dim, *self.grid_shape)
        layers: list[nn.Module] = []
        channels = self.input_shape[0]
        for i, hidden in enumerate(hidden_dims):
            layers.append(downsample_conv(channels, hidden))
            # No ReLU after the last conv: each residual block starts with its own ReLU.
            if i < len(hidden_dims) - 1:
                layers.append(nn.ReLU())
            channels = hidden
        layers += [
            ResidualStack(channels, res_hidden, num_res_blocks),
            nn.Conv2d(channels, code_dim, kernel_size=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.input_shape)
        return self.net(x)


class VQDecoder(nn.Module):
    """(B, code_dim, h, w) -> 3x3 conv -> residual stack -> transposed convs -> (B, C, H, W).

    ``hidden_dims`` is given in ENCODER order, as for ``VQEncoder``; the decoder mirrors it
    (e.g. ``[32, 64]``: code_dim -> 64 -> 32 -> C channels) and ends at exactly (H, W).
    The output has no final activation (Bernoulli logits or Gaussian means).
    """

    def __init__(
        self,
        code_dim: int,
        hidden_dims: Sequence[int],
        output_shape: Sequence[int],
        num_res_blocks: int = 2,
        res_hidden: int = 32,
    ) -> None:
        super().__init__()
        code_dim = positive_int(code_dim, "VQDecoder", "code_dim")
        hidden_dims = positive_int_list(hidden_dims, "VQDecoder", "hidden_dims")
        self.output_shape = image_shape(output_shape, "VQDecoder", "output_shape")
        sizes = spatial_sizes(self.output_shape[1:], len(hidden_dims))
        self.latent_shape = (code_dim, *sizes[-1])
        layers: list[nn.Module] = [
            nn.Conv2d(code_dim, hidden_dims[-1], kernel_size=3, padding=1),
            ResidualStack(hidden_dims[-1], res_hidden, num_res_blocks),
        ]
        out_channels = [self.output_shape[0], *hidden_dims[:-1]]
        for i in reversed(range(len(hidden_dims))):
            layers.append(upsample_conv(hidden_dims[i], out_channels[i], sizes[i + 1], sizes[i]))
            if i > 0:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"z must have shape (batch, {', '.join(map(str, self.latent_shape))}), "
                f"got {tuple(z.shape)}."
            )
        return self.net(z)
