"""Building blocks shared by the MLP, conv and VQ networks.

The conv networks downsample with stride-2 3x3 convolutions with padding 1. Along one
axis of size ``n`` such a layer gives ``floor((n + 2 - 3) / 2) + 1 = ceil(n / 2)``, so
every size works, odd ones included (28 -> 14 -> 7 -> 4, 8 -> 4 -> 2 -> 1). The decoders
mirror them with stride-2 3x3 transposed convolutions, whose output is ``2m - 1 + p``
for input ``m`` and output padding ``p`` in {0, 1}. Choosing ``p = n - (2m - 1)`` from
the encoder's own size sequence (``spatial_sizes``) gives back exactly ``n``, so the
decoder reproduces the input shape without cropping.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vae.nn.validation import positive_int

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]()


def spatial_sizes(input_hw: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """Spatial sizes ``[(H, W), (h1, w1), ..., (hL, wL)]`` through ``num_layers`` stride-2 convs.

    Each layer maps a side ``n`` to ``ceil(n / 2)``. A layer whose input side is already 1
    would not downsample any more, so that case raises ``ValueError``: the image is too
    small for that many layers (e.g. an 8x8 image allows at most 3).
    """
    height = positive_int(input_hw[0], "spatial_sizes", "input_hw[0]")
    width = positive_int(input_hw[1], "spatial_sizes", "input_hw[1]")
    num_layers = int(num_layers)
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}.")
    sizes = [(height, width)]
    for layer in range(num_layers):
        h, w = sizes[-1]
        if h < 2 or w < 2:
            raise ValueError(
                f"hidden_dims asks for {num_layers} stride-2 conv layers, but a {height}x{width} "
                f"image is already {h}x{w} before layer {layer + 1}; use at most {layer} "
                f"entries in hidden_dims for this image size."
            )
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def downsampled_shape(input_hw: Sequence[int], num_layers: int) -> tuple[int, int]:
    """Spatial size ``(h, w)`` after ``num_layers`` stride-2 convs (each side -> ceil(side / 2))."""
    return spatial_sizes(input_hw, num_layers)[-1]


def downsample_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Stride-2 3x3 conv, padding 1: side ``n`` -> ``ceil(n / 2)``."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)


def upsample_conv(
    in_channels: int, out_channels: int, in_hw: Sequence[int], out_hw: Sequence[int]
) -> nn.ConvTranspose2d:
    """Stride-2 3x3 transposed conv that maps ``in_hw`` exactly to ``out_hw``.

    ``out_hw`` must be a size that ``downsample_conv`` maps to ``in_hw``; the output
    padding (0 for odd sides, 1 for even ones) is fixed here, at construction.
    """
    padding = tuple(int(o) - (2 * int(i) - 1) for i, o in zip(in_hw, out_hw, strict=True))
    if any(p not in (0, 1) for p in padding):
        raise ValueError(
            f"upsample_conv cannot map {tuple(in_hw)} to {tuple(out_hw)}: out_hw must be a size "
            "that a stride-2 conv halves (rounding up) to in_hw."
        )
    return nn.ConvTranspose2d(
        in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=padding
    )


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` (van den Oord et al. 2017, Sec. 4.1).

    Keeps shape (B, channels, H, W). The output is pre-activation, so a stack of these
    ends with a ReLU (see ``ResidualStack``).
    """

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        channels = positive_int(channels, "ResidualBlock", "channels")
        hidden_channels = positive_int(hidden_channels, "ResidualBlock", "hidden_channels")
        self.residual = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, channels, kernel_size=1),
        )

    def forward(self, x):
        return x + self.residual(x)


class ResidualStack(nn.Module):
    """``num_blocks`` ``ResidualBlock``s followed by a ReLU; shape (B, channels, H, W) is kept.

    ``num_blocks = 0`` is allowed and gives just the ReLU.
    """

    def __init__(self, channels: int, hidden_channels: int, num_blocks: int) -> None:
        super().__init__()
        if isinstance(num_blocks, bool) or int(num_blocks) != num_blocks or num_blocks < 0:
            raise ValueError(
                f"ResidualStack: argument 'num_blocks' must be an integer >= 0, got {num_blocks!r}."
            )
        self.blocks = nn.Sequential(
            *(ResidualBlock(channels, hidden_channels) for _ in range(int(num_blocks)))
        )
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(self.blocks(x))
