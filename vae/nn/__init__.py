"""Networks: MLP / conv encoders and decoders for any image shape (C, H, W), the Gaussian
encoder head, the VQ-VAE encoder/decoder with residual stacks, and its two quantizers.

Decoders return raw outputs (logits or means, no final activation). ``hidden_dims`` is
always given in encoder order; decoders mirror it.
"""

from vae.nn.blocks import (
    ACTIVATIONS,
    ResidualBlock,
    ResidualStack,
    downsampled_shape,
    make_activation,
    spatial_sizes,
)
from vae.nn.build import build_decoder, build_encoder, set_output_bias
from vae.nn.conv import ConvDecoder, ConvEncoder
from vae.nn.fsq import FiniteScalarQuantizer
from vae.nn.gaussian import GaussianEncoder
from vae.nn.mlp import MLPDecoder, MLPEncoder
from vae.nn.prior import CodePrior
from vae.nn.quantizer import (
    QuantizerOutput,
    VectorQuantizer,
    ema_codebook_update,
    kmeans,
    laplace_smoothed_counts,
    nearest_codes,
)
from vae.nn.vq_nets import VQDecoder, VQEncoder

__all__ = [
    "ACTIVATIONS",
    "ConvDecoder",
    "ConvEncoder",
    "GaussianEncoder",
    "MLPDecoder",
    "MLPEncoder",
    "ResidualBlock",
    "ResidualStack",
    "VQDecoder",
    "VQEncoder",
    "build_decoder",
    "set_output_bias",
    "build_encoder",
    "downsampled_shape",
    "make_activation",
    "spatial_sizes",
    # quantizers (vector, finite scalar) and the prior over their codes
    "CodePrior",
    "FiniteScalarQuantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "ema_codebook_update",
    "kmeans",
    "laplace_smoothed_counts",
    "nearest_codes",
]
