"""Tests for vae.nn: exact shapes for any image size, gradient flow, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from vae.nn import (
    ConvDecoder,
    ConvEncoder,
    GaussianEncoder,
    MLPDecoder,
    MLPEncoder,
    ResidualBlock,
    ResidualStack,
    VQDecoder,
    VQEncoder,
    build_decoder,
    build_encoder,
    downsampled_shape,
)

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
HIDDEN_DIMS = [[16], [8, 16, 32]]
LATENT_DIM = 5
BATCH = 3


def _assert_every_parameter_has_gradient(*modules: nn.Module) -> None:
    for module in modules:
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None, f"{name} got no gradient"
            assert parameter.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("hidden_dims", HIDDEN_DIMS, ids=str)
def test_gaussian_vae_networks_shapes_and_gradients(arch, shape, hidden_dims):
    torch.manual_seed(0)
    encoder = build_encoder(arch, shape, hidden_dims, LATENT_DIM)
    decoder = build_decoder(arch, LATENT_DIM, hidden_dims, shape)
    x = torch.rand(BATCH, *shape)

    mu, logvar = encoder(x)
    assert mu.shape == (BATCH, LATENT_DIM)
    assert logvar.shape == (BATCH, LATENT_DIM)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    x_hat = decoder(z)
    assert x_hat.shape == (BATCH, *shape)

    loss = (x_hat - x).pow(2).sum() + mu.pow(2).sum() + logvar.exp().sum()
    loss.backward()
    _assert_every_parameter_has_gradient(encoder, decoder)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_decoder_keeps_extra_leading_dims(arch):
    decoder = build_decoder(arch, LATENT_DIM, [8, 16], (1, 7, 9))
    z = torch.randn(4, BATCH, LATENT_DIM)  # e.g. 4 importance samples per example
    out = decoder(z)
    assert out.shape == (4, BATCH, 1, 7, 9)
    # The same as decoding each sample on its own.
    torch.testing.assert_close(out[2], decoder(z[2]))


def test_hidden_dims_from_hydra_listconfig():
    hidden_dims = OmegaConf.create({"h": [8, 16]}).h
    mu, _ = build_encoder("conv", (1, 28, 28), hidden_dims, LATENT_DIM)(torch.rand(2, 1, 28, 28))
    assert mu.shape == (2, LATENT_DIM)


@pytest.mark.parametrize(
    ("input_hw", "num_layers", "expected"),
    [
        ((8, 8), 2, (2, 2)),
        ((8, 8), 3, (1, 1)),
        ((28, 28), 2, (7, 7)),
        ((28, 28), 3, (4, 4)),
        ((7, 7), 1, (4, 4)),
        ((32, 32), 3, (4, 4)),
        ((5, 12), 2, (2, 3)),
        ((9, 3), 0, (9, 3)),
    ],
)
def test_downsampled_shape_halves_rounding_up(input_hw, num_layers, expected):
    assert downsampled_shape(input_hw, num_layers) == expected


@pytest.mark.parametrize("height", [5, 6, 7, 8, 11])
@pytest.mark.parametrize("width", [4, 7, 9, 10])
def test_conv_networks_exact_for_odd_and_even_sizes(height, width):
    shape = (2, height, width)
    encoder = ConvEncoder(shape, [4, 6], out_dim=3)
    decoder = ConvDecoder(3, [4, 6], shape)
    features = encoder(torch.rand(2, *shape))
    assert features.shape == (2, 3)
    expected_hw = (math.ceil(math.ceil(height / 2) / 2), math.ceil(math.ceil(width / 2) / 2))
    assert encoder.feature_shape == (6, *expected_hw)
    assert decoder(features).shape == (2, *shape)


def test_conv_layer_sizes_match_downsampled_shape():
    encoder = ConvEncoder((1, 28, 28), [8, 16, 32], out_dim=None)
    h, w = downsampled_shape((28, 28), 3)
    assert encoder.out_dim == 32 * h * w == 32 * 16
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 32 * 16)


def test_decoders_mirror_hidden_dims():
    mlp = MLPDecoder(LATENT_DIM, [512, 256], (1, 8, 8))
    widths = [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert widths == [256, 512, 64]

    conv = ConvDecoder(LATENT_DIM, [8, 16, 32], (3, 32, 32))
    channels = [m.out_channels for m in conv.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert channels == [16, 8, 3]
    first = next(m for m in conv.modules() if isinstance(m, nn.Linear))
    assert first.out_features == 32 * 4 * 4  # (hidden_dims[-1], h, w) of the encoder


def test_plain_encoders_have_linear_output():
    x = torch.rand(BATCH, 1, 8, 8)
    mlp = MLPEncoder((1, 8, 8), [32, 16], out_dim=7)
    assert mlp(x).shape == (BATCH, 7)
    assert isinstance(mlp.net[-1], nn.Linear)
    with torch.no_grad():
        mlp.net[-1].bias.fill_(-100.0)  # far below what the weights can add back
    assert bool((mlp(x) < -50).all())  # the output is not passed through a ReLU
    conv = ConvEncoder((1, 8, 8), [8, 16], out_dim=7, activation="tanh")
    assert conv(x).shape == (BATCH, 7)
    assert isinstance(conv.net[-1], nn.Linear)
    # Without an output layer the features are the activated last hidden layer.
    body = MLPEncoder((1, 8, 8), [32, 16], out_dim=None)
    assert body.out_dim == 16
    assert body(x).min() >= 0


def test_logvar_clamp_is_identity_by_default_and_clamps_when_set():
    torch.manual_seed(0)
    body = MLPEncoder((1, 8, 8), [16], out_dim=None)
    free = GaussianEncoder(body, 16, LATENT_DIM)
    clamped = GaussianEncoder(body, 16, LATENT_DIM, logvar_clamp=(-1.0, 1.0))
    clamped.load_state_dict(free.state_dict())
    with torch.no_grad():  # push logvar well outside [-1, 1] in both directions
        for encoder in (free, clamped):
            encoder.logvar_head.bias.copy_(torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0]))
    x = torch.rand(BATCH, 1, 8, 8)

    mu_free, logvar_free = free(x)
    features = body(x)
    torch.testing.assert_close(logvar_free, free.logvar_head(features))  # no activation
    assert logvar_free.min() < -1 and logvar_free.max() > 1

    mu_clamped, logvar_clamped = clamped(x)
    torch.testing.assert_close(mu_clamped, mu_free)
    torch.testing.assert_close(logvar_clamped, logvar_free.clamp(-1.0, 1.0))
    assert logvar_clamped.min() == -1.0 and logvar_clamped.max() == 1.0

    # The documented cost of clamping: no gradient through the clamped entries.
    logvar_clamped.sum().backward()
    assert clamped.logvar_head.bias.grad[[0, 1, 3, 4]].abs().sum() == 0
    assert clamped.logvar_head.bias.grad[2] == BATCH


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("num_res_blocks", [0, 2])
def test_vq_networks_shapes_and_gradients(shape, num_res_blocks):
    torch.manual_seed(0)
    grid = {8: (2, 2), 28: (7, 7), 32: (8, 8)}[shape[1]]
    encoder = VQEncoder(shape, [8, 16], code_dim=4, num_res_blocks=num_res_blocks, res_hidden=8)
    decoder = VQDecoder(4, [8, 16], shape, num_res_blocks=num_res_blocks, res_hidden=8)
    assert encoder.grid_shape == grid
    assert encoder.latent_shape == decoder.latent_shape == (4, *grid)
    x = torch.rand(2, *shape)
    z_e = encoder(x)
    assert z_e.shape == (2, 4, *grid)
    x_hat = decoder(z_e)
    assert x_hat.shape == (2, *shape)
    (x_hat - x).pow(2).sum().backward()
    _assert_every_parameter_has_gradient(encoder, decoder)


def test_residual_block_adds_skip_and_stack_ends_with_relu():
    torch.manual_seed(0)
    block = ResidualBlock(6, 3)
    x = torch.randn(2, 6, 5, 7)
    assert block(x).shape == x.shape
    with torch.no_grad():  # zero the residual branch's last conv: the block is the identity
        block.residual[-1].weight.zero_()
        block.residual[-1].bias.zero_()
    torch.testing.assert_close(block(x), x)

    stack = ResidualStack(6, 3, num_blocks=3)
    assert len(stack.blocks) == 3
    out = stack(x)
    assert out.shape == x.shape and out.min() >= 0
    torch.testing.assert_close(ResidualStack(6, 3, num_blocks=0)(x), x.relu())


def test_networks_follow_dtype():
    shape = (1, 8, 8)
    encoder = build_encoder("conv", shape, [8, 16], LATENT_DIM).double()
    decoder = build_decoder("conv", LATENT_DIM, [8, 16], shape).double()
    mu, logvar = encoder(torch.rand(2, *shape, dtype=torch.float64))
    assert mu.dtype == logvar.dtype == decoder(mu).dtype == torch.float64
    vq = VQEncoder(shape, [8, 16], 4).to(torch.bfloat16)
    assert vq(torch.rand(2, *shape, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_networks_run_on_cuda(arch):
    shape = (3, 32, 32)
    encoder = build_encoder(arch, shape, [8, 16], LATENT_DIM).cuda()
    decoder = build_decoder(arch, LATENT_DIM, [8, 16], shape).cuda()
    mu, _ = encoder(torch.rand(2, *shape, device="cuda"))
    assert decoder(mu).shape == (2, *shape) and decoder(mu).is_cuda
    vq_enc, vq_dec = VQEncoder(shape, [8, 16], 4).cuda(), VQDecoder(4, [8, 16], shape).cuda()
    assert vq_dec(vq_enc(torch.rand(2, *shape, device="cuda"))).shape == (2, *shape)


@pytest.mark.parametrize("bad_arch", ["resnet", "MLP", ""])
def test_unknown_arch_names_the_argument_and_choices(bad_arch):
    for build in (
        lambda: build_encoder(bad_arch, (1, 8, 8), [8], LATENT_DIM),
        lambda: build_decoder(bad_arch, LATENT_DIM, [8], (1, 8, 8)),
    ):
        with pytest.raises(ValueError, match=r"argument 'arch' must be one of \['conv', 'mlp'\]"):
            build()


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("latent_dim", [0, -2, 2.5, True, "4"])
def test_bad_latent_dim_names_the_argument(arch, latent_dim):
    with pytest.raises(ValueError, match=r"build_encoder: argument 'latent_dim'"):
        build_encoder(arch, (1, 8, 8), [8], latent_dim)
    with pytest.raises(ValueError, match=r"build_decoder: argument 'latent_dim'"):
        build_decoder(arch, latent_dim, [8], (1, 8, 8))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("hidden_dims", [[], [0], [16, -1], "32", 32, [8.5]])
def test_bad_hidden_dims_names_the_argument(arch, hidden_dims):
    with pytest.raises(ValueError, match=r"argument 'hidden_dims' must be a non-empty list"):
        build_encoder(arch, (1, 8, 8), hidden_dims, LATENT_DIM)
    with pytest.raises(ValueError, match=r"argument 'hidden_dims' must be a non-empty list"):
        build_decoder(arch, LATENT_DIM, hidden_dims, (1, 8, 8))


def test_a_network_error_names_the_class_and_argument_not_a_config_key():
    with pytest.raises(ValueError) as error:
        MLPEncoder((1, 8, 8), [], out_dim=None)
    assert str(error.value) == (
        "MLPEncoder: argument 'hidden_dims' must be a non-empty list of positive ints such as "
        "[256, 128], got []."
    )


def test_image_too_small_for_conv_layers_names_hidden_dims():
    too_many = [4, 4, 4, 4]  # 8 -> 4 -> 2 -> 1, a 4th stride-2 layer has nothing to halve
    builders = [
        lambda: ConvEncoder((1, 8, 8), too_many, out_dim=2),
        lambda: ConvDecoder(2, too_many, (1, 8, 8)),
        lambda: VQEncoder((1, 8, 8), too_many, 2),
        lambda: VQDecoder(2, too_many, (1, 8, 8)),
        lambda: build_encoder("conv", (1, 8, 8), too_many, 2),
        lambda: downsampled_shape((8, 8), 4),
    ]
    for build in builders:
        with pytest.raises(ValueError, match=r"hidden_dims.*at most 3"):
            build()
    # A thin image limits the depth by its short side.
    with pytest.raises(ValueError, match="at most 1"):
        ConvEncoder((1, 2, 30), [4, 4], out_dim=2)


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: build_encoder("mlp", (28, 28), [8], 2), "input_shape"),
        (lambda: build_encoder("conv", (1, 0, 28), [8], 2), "input_shape"),
        (lambda: build_decoder("mlp", 2, [8], (1, 28)), "output_shape"),
        (lambda: build_encoder("mlp", (1, 8, 8), [8], 2, activation="swish!"), "activation"),
        (lambda: build_encoder("mlp", (1, 8, 8), [8], 2, logvar_clamp=(5, -5)), "logvar_clamp"),
        (lambda: build_encoder("mlp", (1, 8, 8), [8], 2, logvar_clamp=(1,)), "logvar_clamp"),
        (lambda: MLPEncoder((1, 8, 8), [8], out_dim=0), "out_dim"),
        (lambda: VQEncoder((1, 8, 8), [8], code_dim=0), "VQEncoder: argument 'code_dim'"),
        (lambda: VQDecoder(4, [8], (1, 8, 8), num_res_blocks=-1), "num_blocks"),
        (lambda: VQEncoder((1, 8, 8), [8], 4, res_hidden=0), "hidden_channels"),
        (lambda: GaussianEncoder(nn.Flatten(), 0, 2), "feature_dim"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_wrong_input_shapes_raise_clear_errors():
    encoder = build_encoder("conv", (1, 8, 8), [8], LATENT_DIM)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 8, 8\)"):
        encoder(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"x must have shape"):
        build_encoder("mlp", (1, 8, 8), [8], LATENT_DIM)(torch.rand(2, 64))
    with pytest.raises(ValueError, match=r"z must have shape"):
        build_decoder("conv", LATENT_DIM, [8], (1, 8, 8))(torch.rand(2, LATENT_DIM + 1))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 4, 4, 4\)"):
        VQDecoder(4, [8], (1, 8, 8))(torch.rand(2, 4, 5, 5))
    mismatched = GaussianEncoder(MLPEncoder((1, 8, 8), [8], out_dim=None), 9, LATENT_DIM)
    with pytest.raises(ValueError, match="feature_dim"):
        mismatched(torch.rand(2, 1, 8, 8))
