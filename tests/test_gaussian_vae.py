"""The Gaussian VAE module: its loss against a hand computation, schedules, the non-finite guard."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from vae.losses import BetaKL, CapacityKL, FreeBitsKL, LinearWarmup, kl_regulariser
from vae.models import GaussianVAE
from vae.training.callbacks import NonFiniteGuard, NonFiniteLossError, gradients_are_finite


def _hand_loss(model: GaussianVAE, x: torch.Tensor, eps: torch.Tensor, beta: float):
    """recon + beta * KL written out from the textbook formulas, in float64."""
    mu, logvar = (t.double() for t in model.encode(x))
    z = mu + torch.exp(0.5 * logvar) * eps.double()
    logits = model.decode(z.float()).double()
    p = torch.sigmoid(logits)
    x = x.double()
    recon = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).flatten(1).sum(1).mean()
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(1).mean()
    return recon, kl, recon + beta * kl


def test_loss_equals_hand_computation():
    torch.manual_seed(0)
    model = GaussianVAE(
        image_shape=(1, 4, 4), hidden_dims=[8], latent_dim=3, beta=2.5, data_levels=2
    )
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.4))
    torch.manual_seed(1)
    loss, terms = model.compute_terms(x, step=0)
    torch.manual_seed(1)
    eps = torch.randn(5, 3)
    recon, kl, total = _hand_loss(model, x, eps, beta=2.5)
    terms = {k: float(v) for k, v in terms.items()}
    assert terms["recon"] == pytest.approx(float(recon), rel=1e-5)
    assert terms["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert float(loss) == pytest.approx(float(total), rel=1e-5)
    assert terms["elbo"] == pytest.approx(-float(recon + kl), rel=1e-5)
    assert terms["bits_per_dim"] == pytest.approx(-terms["elbo"] / (16 * math.log(2)))


def test_gaussian_likelihood_with_learned_sigma_gets_gradient():
    model = GaussianVAE(
        image_shape=(3, 8, 8),
        arch="conv",
        hidden_dims=[8, 16],
        latent_dim=2,
        likelihood="gaussian",
        learn_sigma=True,
    )
    loss, _ = model.compute_terms(torch.rand(4, 3, 8, 8), step=0)
    loss.backward()
    log_sigma = model.likelihood.log_sigma
    assert log_sigma.grad is not None and log_sigma.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, regulariser_type",
    [
        ({"kl_schedule": "linear"}, BetaKL),
        ({"kl_schedule": "capacity"}, CapacityKL),
        ({"free_bits": 0.5}, FreeBitsKL),
    ],
)
def test_kl_schedule_selected_from_the_shorthand_keys(kwargs, regulariser_type):
    model = GaussianVAE(image_shape=(1, 8, 8), **kwargs)
    assert isinstance(model.regulariser, regulariser_type)


def test_regulariser_part_from_its_config():
    part = {"_target_": "vae.losses.kl_regulariser", "kl_schedule": "linear", "warmup_steps": 7}
    model = GaussianVAE(image_shape=(1, 8, 8), regulariser=part)
    assert model.regulariser.schedule == LinearWarmup(beta=1.0, warmup_steps=7)
    assert model.hparams["regulariser"] == part  # saved, so load_from_checkpoint rebuilds it


def test_linear_warmup_beta_follows_the_step():
    regulariser = kl_regulariser("linear", beta=2.0, warmup_steps=10)
    model = GaussianVAE(image_shape=(1, 8, 8), regulariser=regulariser)
    x = torch.rand(4, 1, 8, 8).round()
    assert model.compute_terms(x, step=0)[1]["beta"] == 0.0
    assert model.compute_terms(x, step=5)[1]["beta"] == pytest.approx(1.0)
    assert model.compute_terms(x, step=50)[1]["beta"] == pytest.approx(2.0)
    assert isinstance(model.regulariser.schedule, LinearWarmup)


def test_capacity_and_free_bits_together_is_an_error():
    with pytest.raises(ValueError, match="free_bits"):
        GaussianVAE(image_shape=(1, 8, 8), kl_schedule="capacity", free_bits=0.5)


class _NaNAtStep(GaussianVAE):
    """Returns a NaN reconstruction term from optimizer step ``bad_step`` on."""

    bad_step = 6

    def reconstruction_nll(self, params, x):
        nll = super().reconstruction_nll(params, x)
        if self.training and self.global_step >= self.bad_step:
            nll = nll + float("nan")
        return nll


def _guarded_trainer(max_epochs: int, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer with the NaN/inf guard: no logger, checkpoints or validation unless
    ``kwargs`` say otherwise."""
    settings = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        **kwargs,
    }
    callbacks = [*settings.pop("callbacks", []), NonFiniteGuard()]
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", callbacks=callbacks, **settings)


def test_nonfinite_loss_stops_with_term_and_step_and_keeps_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 8, 8).round(), torch.zeros(64, dtype=torch.long))
    model = _NaNAtStep(image_shape=(1, 8, 8), hidden_dims=[16], latent_dim=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer = _guarded_trainer(5, callbacks=[checkpoint], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match=r"non-finite recon .* step 6"):
        trainer.fit(model, DataLoader(data, batch_size=16))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6
    weights = saved["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_gradient_stops_naming_the_parameter(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 8, 8).round(), torch.zeros(64, dtype=torch.long))
    model = GaussianVAE(image_shape=(1, 8, 8), hidden_dims=[16], latent_dim=2)
    weight = (
        model.decoder.net[0].weight
        if hasattr(model.decoder, "net")
        else next(model.decoder.parameters())
    )
    name = next(n for n, p in model.named_parameters() if p is weight)
    # The loss stays finite; only this parameter's gradient turns NaN, at step 3.
    weight.register_hook(lambda g: g * float("nan") if model.global_step == 3 else g)
    trainer = _guarded_trainer(2)
    with pytest.raises(
        NonFiniteLossError, match=rf"non-finite gradient of {name} at training step 3"
    ):
        trainer.fit(model, DataLoader(data, batch_size=16))


@pytest.mark.parametrize(
    "poison, finite",
    [
        (None, True),
        ((1, 3, float("nan")), False),
        ((0, 0, float("inf")), False),
        ((2, 5, float("-inf")), False),
    ],
)
def test_gradients_are_finite_finds_any_nonfinite_entry(poison, finite):
    gradients = [torch.randn(7, 9), torch.randn(3, 11), torch.randn(5, 6)]
    if poison is not None:
        tensor, index, value = poison
        gradients[tensor].view(-1)[index] = value
    assert gradients_are_finite(gradients) is finite


def test_gradients_are_finite_is_not_fooled_by_cancelling_or_overflowing_sums():
    # +inf in one tensor and -inf in another: the total is NaN, and it is not finite.
    opposite = [torch.full((4,), float("inf")), torch.full((4,), float("-inf"))]
    assert gradients_are_finite(opposite) is False
    # Huge finite values whose float32 sum overflows to inf: every entry is finite.
    huge = [torch.full((8,), 3e38), torch.full((8,), -3e38)]
    assert torch.isinf(huge[0].sum())
    assert gradients_are_finite(huge) is True
    # Half precision, where 65504 is the largest finite value.
    halves = [torch.full((4,), 6e4, dtype=torch.float16), torch.ones(3, dtype=torch.float16)]
    assert gradients_are_finite(halves) is True
    halves[1][2] = float("nan")
    assert gradients_are_finite(halves) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gradients_are_finite_on_cuda():
    gradients = [torch.randn(7, 9, device="cuda"), torch.randn(300, device="cuda")]
    assert gradients_are_finite(gradients) is True
    gradients[1][17] = float("nan")
    assert gradients_are_finite(gradients) is False
    huge = [torch.full((8,), 3e38, device="cuda"), torch.full((8,), -3e38, device="cuda")]
    assert gradients_are_finite(huge) is True


def test_gradient_check_leaves_fp16_overflow_to_the_grad_scaler():
    """Under fp16 mixed precision a too-large loss scale gives inf gradients by design: the
    scaler skips that step and lowers its scale. The finite-gradient guard must not stop the
    run there (it did: training died at the first overflow)."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    model = GaussianVAE(image_shape=(1, 8, 8), hidden_dims=[16], latent_dim=2)
    before = [p.detach().clone() for p in model.parameters()]
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 8, 8).round())
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 3
    assert scaler.get_scale() < 2.0**60  # the scaler met inf gradients and backed off
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_a_checkpoint_of_the_old_layout_is_refused_with_a_clear_message():
    from vae.training.checkpoints import CheckpointError, check_compatible

    model = GaussianVAE(image_shape=(1, 8, 8))
    old = {"state_dict": model.state_dict(), "hyper_parameters": {}, "model_class": "GaussianVAE"}
    with pytest.raises(CheckpointError, match="older kl-vae .format 1"):
        check_compatible(old, model, path="old.ckpt")
    check_compatible({**old, "format": 2}, model)  # the current layout passes


def test_a_nan_before_any_checkpoint_says_none_was_written():
    class NaNAtOnce(_NaNAtStep):
        bad_step = 0

    data = TensorDataset(torch.rand(32, 1, 8, 8).round(), torch.zeros(32, dtype=torch.long))
    model = NaNAtOnce(image_shape=(1, 8, 8), hidden_dims=[16], latent_dim=2)
    trainer = _guarded_trainer(1)
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        trainer.fit(model, DataLoader(data, batch_size=16))


class _NaNInValidation(GaussianVAE):
    def reconstruction_nll(self, params, x):
        nll = super().reconstruction_nll(params, x)
        return nll if self.training else nll + float("nan")


def test_a_nan_in_validation_stops_naming_the_term_before_anything_is_written(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.cli import load_events

    data = TensorDataset(torch.rand(32, 1, 8, 8).round(), torch.zeros(32, dtype=torch.long))
    model = _NaNInValidation(image_shape=(1, 8, 8), hidden_dims=[16], latent_dim=2)
    trainer = _guarded_trainer(
        1,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        limit_val_batches=None,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(data, batch_size=16)
    with pytest.raises(NonFiniteLossError, match="non-finite validation loss .* after training"):
        trainer.fit(model, loader, loader)
    assert not [t for t in load_events(tmp_path).Tags()["scalars"] if t.startswith("val/")]


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load():
    from vae.training.checkpoints import CheckpointError, check_compatible

    model = GaussianVAE(image_shape=(1, 8, 8))
    state = model.state_dict()
    name = next(iter(state))
    state[name] = state[name].clone().fill_(float("inf"))
    checkpoint = {"state_dict": state, "format": 2, "model_class": "GaussianVAE"}
    with pytest.raises(CheckpointError, match=f"not finite .NaN or inf in {name}"):
        check_compatible(checkpoint, model)


def test_vae_eval_writes_no_nan_and_keeps_the_legitimately_infinite_label_kl():
    from experiments.evaluate import EvaluationError, check_finite_metrics

    check_finite_metrics({"test/elbo": -20.0, "test/label_kl_reverse": float("inf")})
    with pytest.raises(EvaluationError, match=r"test/elbo=nan.*nothing was written"):
        check_finite_metrics({"test/elbo": float("nan"), "test/nll_iw": 3.0})
    with pytest.raises(EvaluationError, match="test/nll_iw=inf"):
        check_finite_metrics({"test/nll_iw": float("inf")})


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_output_bias_starts_at_the_training_mean_image(arch, likelihood):
    """init_output_bias: with the last layer's weights zeroed, the decoder's mean is the
    training split's mean image (per pixel for an MLP, per channel for a convolution), the
    logit clamped to [0.001, 0.999] for pixels that are always 0."""
    from types import SimpleNamespace

    images = torch.rand(50, 1, 8, 8)
    images[:, :, 0, 0] = 0.0  # a pixel that is off in every image
    model = GaussianVAE((1, 8, 8), arch=arch, hidden_dims=[4], latent_dim=2, likelihood=likelihood)
    model._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(train_split=SimpleNamespace(images=images))
    )
    model.setup("fit")
    last = [m for m in model.decoder.modules() if getattr(m, "bias", None) is not None][-1]
    torch.nn.init.zeros_(last.weight)
    decoded = model.decode(torch.zeros(1, 2))[0]
    params = model.likelihood.params_for_mean(images.mean(0))  # logit(clamp(mean)) or mean
    if arch == "conv":
        params = params.mean((1, 2), keepdim=True).expand_as(params)
    torch.testing.assert_close(decoded, params)
    decoded = model.likelihood.mean(decoded)
    if arch == "mlp" and likelihood == "bernoulli":
        assert float(decoded[0, 0, 0]) == pytest.approx(1e-3)


def test_output_bias_is_left_alone_when_switched_off_or_not_training():
    from types import SimpleNamespace

    images = torch.rand(10, 1, 8, 8)
    for init, stage in ((False, "fit"), (True, "test")):
        model = GaussianVAE((1, 8, 8), hidden_dims=[4], latent_dim=2, init_output_bias=init)
        before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
        model._trainer = SimpleNamespace(
            datamodule=SimpleNamespace(train_split=SimpleNamespace(images=images))
        )
        model.setup(stage)
        for key, value in model.decoder.state_dict().items():
            assert torch.equal(value, before[key])


class _RecordsLearningRate(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_lr_schedule_decays_to_zero_over_the_run_and_constant_keeps_it():
    data = DataLoader(TensorDataset(torch.rand(40, 1, 8, 8).round()), batch_size=8)  # 5 steps
    for schedule in ("constant", "cosine"):
        model = GaussianVAE(
            (1, 8, 8), hidden_dims=[16], latent_dim=2, lr=0.01, lr_schedule=schedule
        )
        model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=0.01)
        record = _RecordsLearningRate()
        _guarded_trainer(2, callbacks=[record]).fit(model, data)
        if schedule == "constant":
            assert record.lrs == [0.01] * 10
        else:  # lr_t = 0.01 * (1 + cos(pi t / 10)) / 2, before each of the 10 steps
            expected = [0.01 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)]
            assert record.lrs == pytest.approx(expected, rel=1e-6)


def test_an_unknown_lr_schedule_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model.lr_schedule='linear' is not known"):
        GaussianVAE((1, 8, 8), lr_schedule="linear")
