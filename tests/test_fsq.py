"""Finite Scalar Quantization (vae.nn.FiniteScalarQuantizer): the grid, the implicit index, the
straight-through gradient, the code statistics, and the VQ-VAE and its prior built on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from experiments.train import RUN_OPTIONS
from tests.cli import QUICK, last_line, run_cli
from vae.eval.epoch_statistics import CodeUsage
from vae.models import VQVAE, VQVAEPrior
from vae.models.vqvae_prior import load_frozen_vqvae
from vae.nn import FiniteScalarQuantizer, VectorQuantizer
from vae.nn.fsq import RECOMMENDED_LEVELS, fsq_gradient
from vae.training import tags

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
LEVEL_SETS = list(RECOMMENDED_LEVELS.values())


def preimages(quantizer: FiniteScalarQuantizer, codes: torch.Tensor) -> torch.Tensor:
    """z (N, d) whose bounded value is code * floor(L / 2), the middle of its rounding cell,
    written from the paper's formulas in float64 (independent of the module's helpers). The
    bound never reaches the outermost cells' middles (an even L's top code, e.g. 3 of [-4, 3.5)
    for L = 8), so targets stay 1/4 inside the bound's open interval."""
    levels = torch.tensor(quantizer.levels, dtype=torch.float64)
    half = (levels - 1) * (1 - 1e-3) / 2
    offset = (levels % 2 == 0).double() * 0.5
    shift = torch.where(offset < half, torch.atanh(offset / half), 0.0)
    target = codes.double() * torch.floor(levels / 2)
    target = torch.minimum(torch.maximum(target, -half - offset + 0.25), half - offset - 0.25)
    return (torch.atanh((target + offset) / half) - shift).float()


def channels_first(flat: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, d, 1, 1), a 1x1 grid per example."""
    return flat[:, :, None, None]


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_every_code_has_its_own_index_and_comes_back(levels):
    quantizer = FiniteScalarQuantizer(levels)
    assert quantizer.num_codes == math.prod(levels) and quantizer.code_dim == len(levels)
    indices = torch.arange(quantizer.num_codes)
    codes = quantizer.indices_to_codes(indices)
    assert torch.unique(codes, dim=0).shape[0] == quantizer.num_codes  # distinct grid points
    assert torch.equal(quantizer.codes_to_indices(codes), indices)
    # Quantizing the centre of every code's cell gives that code and its index.
    out = quantizer(channels_first(preimages(quantizer, codes)))
    assert torch.equal(out.indices.flatten(), indices)
    assert torch.equal(out.quantized.flatten(1), codes)
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)


@given(st.lists(st.integers(2, 9), min_size=1, max_size=4))
@settings(max_examples=30, deadline=None)
def test_the_mixed_radix_index_is_a_bijection_for_any_levels(levels):
    quantizer = FiniteScalarQuantizer(levels)
    indices = torch.arange(quantizer.num_codes)
    codes = quantizer.indices_to_codes(indices)
    assert torch.equal(quantizer.codes_to_indices(codes), indices)
    # index = sum_i k_i prod_{j<i} L_j, by hand for the last code (every k_i = L_i - 1).
    assert int(quantizer.codes_to_indices(codes[-1:])) == math.prod(levels) - 1


@pytest.mark.parametrize("levels", [*LEVEL_SETS, [2], [3, 4], [2, 2, 2]], ids=str)
def test_each_channel_takes_exactly_its_levels(levels):
    quantizer = FiniteScalarQuantizer(levels)
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(20_000, len(levels), generator=generator) * 4
    extremes = torch.tensor([-1e4, 1e4, 0.0]).repeat_interleave(len(levels)).view(3, -1)
    out = quantizer(channels_first(torch.cat([wide, extremes])))
    values = out.quantized.flatten(1)
    for channel, level in enumerate(levels):
        half_width = level // 2
        expected = (torch.arange(level) - half_width).float() / half_width
        assert torch.equal(torch.unique(values[:, channel]), expected)
    assert torch.equal(values[-1], torch.zeros(len(levels)))  # z = 0 is the code 0


def test_gradient_passes_straight_through_scaled_by_the_bound_derivative():
    quantizer = FiniteScalarQuantizer([8, 5, 5, 5])
    generator = torch.Generator().manual_seed(1)
    z = (torch.randn(7, 4, 3, 2, generator=generator) * 2).requires_grad_(True)
    weights = torch.randn(7, 4, 3, 2, generator=generator)
    (quantizer(z).quantized * weights).sum().backward()
    # d code_i / d z_i = d/dz [half tanh(z + shift) - offset] / floor(L / 2), in float64 autograd.
    z64 = z.detach().double().movedim(1, -1).requires_grad_(True)
    levels = torch.tensor([8.0, 5, 5, 5], dtype=torch.float64)
    half = (levels - 1) * (1 - 1e-3) / 2
    shift = torch.atanh((levels % 2 == 0).double() * 0.5 / half)  # L >= 4 here
    bounded_scaled = half * torch.tanh(z64 + shift) / torch.floor(levels / 2)
    (bounded_scaled * weights.double().movedim(1, -1)).sum().backward()
    torch.testing.assert_close(z.grad, z64.grad.movedim(-1, 1).float())
    # ... which is what fsq_gradient documents, and 1 / floor(L / 2) * half * (1 - tanh^2) at 0.
    diagonal = fsq_gradient(z.detach().movedim(1, -1), quantizer.level_values)
    torch.testing.assert_close(z.grad, (diagonal * weights.movedim(1, -1)).movedim(-1, 1))
    assert quantizer(torch.zeros(1, 4, 1, 1)).quantized.abs().max() == 0


def test_usage_and_perplexity_are_counted_from_the_implicit_indices():
    quantizer = FiniteScalarQuantizer([3, 4])  # 12 codes; index = k_0 + 3 k_1
    # Codes (k_0, k_1) = (1, 2) twice -> index 7; (0, 0) -> 0; (2, 3) -> 11.
    digits = torch.tensor([[1, 2], [1, 2], [0, 0], [2, 3]], dtype=torch.float64)
    codes = (digits - torch.tensor([1.0, 2.0])) / torch.tensor([1.0, 2.0])
    out = quantizer.eval()(channels_first(preimages(quantizer, codes)))
    assert out.indices.flatten().tolist() == [7, 7, 0, 11]
    expected_counts = torch.zeros(12)
    expected_counts[[7, 0, 11]] = torch.tensor([2.0, 1.0, 1.0])
    assert torch.equal(out.counts, expected_counts)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # p = (1/2, 1/4, 1/4)
    assert out.perplexity.item() == pytest.approx(math.exp(entropy), rel=1e-6)
    usage = CodeUsage(quantizer.num_codes)
    usage.update(out.indices)
    counts, epoch_perplexity, fraction = usage.compute()
    assert fraction.item() == pytest.approx(3 / 12)
    assert epoch_perplexity.item() == pytest.approx(math.exp(entropy), rel=1e-9)


def test_no_auxiliary_losses_and_no_dead_codes():
    quantizer = FiniteScalarQuantizer([8, 5, 5, 5]).train()
    out = quantizer(torch.randn(2, 4, 3, 3))
    assert out.loss.item() == out.codebook_loss.item() == out.commitment_loss.item() == 0.0
    assert out.dead_codes.item() == 0 and quantizer.num_restarted.item() == 0
    assert quantizer.state_dict() == {}  # nothing learned, nothing saved: levels are the config


@pytest.mark.parametrize("levels", [[], [8, 1], "855", [8, 2.5], [True, 3], 8, None])
def test_bad_levels_are_refused_naming_the_argument(levels):
    with pytest.raises(ValueError, match="argument 'levels'"):
        FiniteScalarQuantizer(levels)


def test_the_callers_code_space_must_match_the_levels():
    FiniteScalarQuantizer([8, 6, 5], code_dim=3, num_codes=240)
    with pytest.raises(
        ValueError, match=r"code_dim=4 and num_codes=1000 were asked; set code_dim=3"
    ):
        FiniteScalarQuantizer([8, 6, 5], code_dim=4, num_codes=1000)
    quantizer = FiniteScalarQuantizer([8, 6, 5])
    with pytest.raises(ValueError, match="len\\(levels\\)"):
        quantizer(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 240\)"):
        quantizer.lookup(torch.tensor([[240]]))


# --- in the VQ-VAE --------------------------------------------------------------------------------


FSQ = {"_target_": "vae.nn.FiniteScalarQuantizer", "_partial_": True, "levels": [5, 3]}


def test_a_vqvae_with_fsq_trains_and_its_checkpoint_feeds_the_prior(tmp_path):
    torch.manual_seed(0)
    image = (1, 8, 8)
    vqvae = VQVAE(
        image, hidden_dims=[8, 16], code_dim=2, res_hidden=8, data_levels=2, quantizer=FSQ
    )
    assert isinstance(vqvae.quantizer, FiniteScalarQuantizer) and vqvae.num_codes == 15
    x = torch.rand(6, *image).round()
    loss, terms = vqvae.train().compute_terms(x, step=0)
    assert terms["vq_loss"].item() == 0.0 and loss.item() == pytest.approx(terms["recon"].item())
    assert terms["kl"].item() == pytest.approx(4 * math.log(15))  # 2x2 grid, uniform prior
    loss.backward()
    assert all(p.grad is not None for p in vqvae.encoder.parameters())
    path = tmp_path / "fsq.ckpt"
    torch.save(
        {
            "state_dict": vqvae.state_dict(),
            "hyper_parameters": dict(vqvae.hparams),
            "model_class": "VQVAE",
            "pytorch-lightning_version": "2.0.0",
        },
        path,
    )
    loaded = load_frozen_vqvae(str(path), image, data_levels=2)
    assert loaded.quantizer.levels == (5, 3)
    torch.testing.assert_close(loaded.encode_indices(x), vqvae.eval().encode_indices(x))
    prior = VQVAEPrior(image, vqvae_ckpt=str(path), dim=8, depth=1, heads=2, data_levels=2)
    assert prior.prior.num_codes == 15
    prior_loss, _ = prior.compute_terms(x, step=0)
    assert math.isfinite(prior_loss.item())


def test_a_vq_config_without_a_quantizer_group_still_builds_a_vector_quantizer():
    vqvae = VQVAE((1, 8, 8), hidden_dims=[8, 16], code_dim=4, num_codes=16, res_hidden=8)
    assert isinstance(vqvae.quantizer, VectorQuantizer) and vqvae.num_codes == 16


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["model=vqvae", *overrides]).model


def test_the_quantizer_group_keeps_the_everyday_keys():
    vq = compose_model("model.num_codes=512", "model.ema=false", "model.commitment=0.5")
    assert vq.quantizer._target_ == "vae.nn.VectorQuantizer"
    assert (vq.quantizer.num_codes, vq.quantizer.ema, vq.quantizer.commitment) == (512, False, 0.5)
    fsq = compose_model("model/quantizer=fsq", "model.quantizer.levels=[8,6,5]")
    assert fsq.quantizer._target_ == "vae.nn.FiniteScalarQuantizer"
    assert list(fsq.quantizer.levels) == [8, 6, 5]
    assert (fsq.code_dim, fsq.num_codes) == (4, 1000)  # fsq.yaml's, for the default levels


@pytest.mark.slow
def test_vae_train_with_fsq_logs_usage_and_its_checkpoint_trains_a_prior(tmp_path):
    proc = run_cli(
        "vae-train",
        "model=vqvae",
        "model/quantizer=fsq",
        "data=digits",
        "debug=limit",
        *QUICK,
        cwd=tmp_path,
    )
    run_dir = tmp_path / last_line(proc.stdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 1,000 codes: usage is a whole number of codes over 1,000; perplexity at most the codes used.
    used = metrics[tags.VAL_CODEBOOK_USAGE] * 1000
    assert 0 < used <= 1000 and used == pytest.approx(round(used), abs=1e-3)
    assert 1 <= metrics[tags.VAL_PERPLEXITY] <= used + 1e-3
    assert metrics[tags.TRAIN_VQ_LOSS] == 0.0
    assert metrics[tags.TRAIN_KL] == pytest.approx(4 * math.log(1000), rel=1e-6)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli(
        "vae-train",
        "model=vqvae_prior",
        f"model.vqvae_ckpt={ckpt}",
        "model.dim=16",
        "model.depth=1",
        "model.num_images=4",
        "data=digits",
        "debug=limit",
        *QUICK,
        cwd=tmp_path,
    )
    prior = json.loads((tmp_path / last_line(proc.stdout) / "metrics.json").read_text())
    assert prior[tags.VAL_RECON] == pytest.approx(metrics[tags.VAL_RECON], rel=1e-4)
    assert 0 < prior[tags.VAL_KL] < 4 * math.log(1000) + 1.0


QUANTIZER_ARMS = sorted(Path(CONFIG_DIR, "quantizer_arm").glob("*.yaml"))


def test_each_arm_of_the_quantizer_table_builds_with_1000_codes():
    """`vae-train -m experiment=quantizers_fashion`: every arm file is in the sweep, and each
    builds a model with 1,000 codes that quantizes a Fashion-MNIST-sized batch."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        sweep = compose(
            "config", overrides=["experiment=quantizers_fashion"], return_hydra_config=True
        ).hydra.sweeper.params["+quantizer_arm"]
        assert {p.stem for p in QUANTIZER_ARMS} == set(sweep.split(","))
        models = {
            arm.stem: compose(
                "config", overrides=["experiment=quantizers_fashion", f"+quantizer_arm={arm.stem}"]
            ).model
            for arm in QUANTIZER_ARMS
        }
    built = {}
    for arm, config in models.items():
        arguments = OmegaConf.to_container(config, resolve=True)
        arguments.pop("_target_")
        for option in RUN_OPTIONS:  # how vae-train runs the networks, not model arguments
            arguments.pop(option)
        model = VQVAE((1, 28, 28), **arguments)
        assert model.num_codes == 1000 and model.grid_shape == (7, 7)
        assert model(torch.rand(2, 1, 28, 28))[1].indices.shape == (2, 7, 7)
        built[arm] = model.quantizer
    assert isinstance(built["fsq"], FiniteScalarQuantizer) and built["fsq"].levels == (8, 5, 5, 5)
    assert (
        built["vq_restarts"].restart_dead_codes and not built["vq_no_restarts"].restart_dead_codes
    )
