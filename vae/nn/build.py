"""Build the Gaussian VAE's encoder and decoder from an architecture name, ``"mlp"`` or
``"conv"`` (``conf/model/vae.yaml`` calls these as partial Hydra targets).

``hidden_dims`` lists the hidden layers in encoder order, input side first; the decoder
mirrors it. For ``arch="mlp"`` they are the widths of the fully connected hidden layers;
for ``arch="conv"`` they are the channels of the stride-2 convs. The mu/logvar heads
read the last hidden layer directly (no extra linear layer in between).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae.nn.conv import ConvDecoder, ConvEncoder
from vae.nn.gaussian import GaussianEncoder
from vae.nn.mlp import MLPDecoder, MLPEncoder
from vae.nn.validation import positive_int, positive_int_list

ENCODERS = {"mlp": MLPEncoder, "conv": ConvEncoder}
DECODERS = {"mlp": MLPDecoder, "conv": ConvDecoder}


def _check_arch(arch: str, owner: str) -> str:
    if arch not in ENCODERS:
        raise ValueError(
            f"{owner}: argument 'arch' must be one of {sorted(ENCODERS)}, got {arch!r}."
        )
    return arch


def build_encoder(
    arch: str,
    input_shape: Sequence[int],
    hidden_dims: Sequence[int],
    latent_dim: int,
    activation: str = "relu",
    logvar_clamp: Sequence[float] | None = None,
) -> GaussianEncoder:
    """Return a ``GaussianEncoder`` whose forward maps (B, C, H, W) to ``(mu, logvar)``, each
    (B, latent_dim). See ``GaussianEncoder`` for ``logvar_clamp`` (off by default)."""
    arch = _check_arch(arch, "build_encoder")
    latent_dim = positive_int(latent_dim, "build_encoder", "latent_dim")
    hidden_dims = positive_int_list(hidden_dims, "build_encoder", "hidden_dims")
    body = ENCODERS[arch](input_shape, hidden_dims, out_dim=None, activation=activation)
    return GaussianEncoder(body, body.out_dim, latent_dim, logvar_clamp=logvar_clamp)


def build_decoder(
    arch: str,
    latent_dim: int,
    hidden_dims: Sequence[int],
    output_shape: Sequence[int],
    activation: str = "relu",
) -> nn.Module:
    """Return a decoder mapping z (..., latent_dim) to raw outputs (..., C, H, W)."""
    arch = _check_arch(arch, "build_decoder")
    latent_dim = positive_int(latent_dim, "build_decoder", "latent_dim")
    hidden_dims = positive_int_list(hidden_dims, "build_decoder", "hidden_dims")
    return DECODERS[arch](latent_dim, hidden_dims, output_shape, activation=activation)


@torch.no_grad()
def set_output_bias(decoder: nn.Module, value: torch.Tensor) -> None:
    """Set the bias of ``decoder``'s last layer so that a zero pre-activation outputs ``value``
    (C, H, W): one bias per pixel for a final ``Linear`` of C*H*W outputs (``MLPDecoder``),
    the per-channel mean of ``value`` for a final convolution of C channels (``ConvDecoder``).
    """
    layer = next(
        (m for m in reversed(list(decoder.modules())) if getattr(m, "bias", None) is not None),
        None,
    )
    if isinstance(layer, nn.Linear) and layer.out_features == value.numel():
        layer.bias.copy_(value.reshape(-1))
    elif isinstance(layer, nn.modules.conv._ConvNd) and layer.bias.shape[0] == value.shape[0]:
        layer.bias.copy_(value.reshape(value.shape[0], -1).mean(1))
    else:
        raise ValueError(
            f"set_output_bias: the last layer with a bias of {type(decoder).__name__} "
            f"({type(layer).__name__}) does not output images of shape {tuple(value.shape)}."
        )
