"""benchmarks/bench_gpu.py: its bare conv VAE is the configured one, its pythae-style IW-NLL
loop gives our estimate from the same draws, its warm-up clock drops the first epoch, and it
refuses CUDA where there is none. The timings themselves are not tested (a smoke run:
``bench_gpu.py --device cpu --quick``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402

from vae.eval.nll import importance_weighted_nll  # noqa: E402
from vae.models import GaussianVAE  # noqa: E402
from vae.nn import build_decoder, build_encoder  # noqa: E402


def test_plain_conv_vae_has_the_layers_of_the_configured_conv_vae():
    """model.arch=conv model.hidden_dims=[32,64] model.latent_dim=16 on 1x28x28: the same
    parameter shapes, in the same order (encoder body, mu head, logvar head, decoder)."""
    encoder = build_encoder("conv", (1, 28, 28), [32, 64], 16)
    decoder = build_decoder("conv", 16, [32, 64], (1, 28, 28))
    ours = [p.shape for p in [*encoder.parameters(), *decoder.parameters()]]
    plain = [p.shape for p in bench_gpu.PlainConvVAE().parameters()]
    assert plain == ours


def test_plain_conv_vae_loss_is_the_negative_elbo():
    torch.manual_seed(0)
    model = bench_gpu.PlainConvVAE()
    x = (torch.rand(4, 1, 28, 28) < 0.5).float()
    torch.manual_seed(1)
    loss = model(x)
    torch.manual_seed(1)
    features = model.body(x)
    mu, logvar = model.mu_head(features), model.logvar_head(features)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    likelihood = torch.distributions.Bernoulli(logits=model.decoder(z))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = torch.distributions.kl_divergence(posterior, prior).sum(1)
    expected = (-likelihood.log_prob(x).flatten(1).sum(1) + kl).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)


def test_pythae_style_loop_matches_ours_on_the_same_draws():
    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[32], latent_dim=4).eval()
    x = (torch.rand(2, 1, 28, 28) < 0.3).float()
    k, per_call = 300, 100
    theirs = bench_gpu.pythae_style_nll(model, x, k, samples_per_call=per_call, seeds=[5, 6])
    ours = torch.stack(
        [
            importance_weighted_nll(
                model,
                x[i : i + 1],
                k,
                chunk_size=per_call,
                generator=torch.Generator().manual_seed(seed),
            )[0]
            for i, seed in enumerate([5, 6])
        ]
    )
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-3)
    # Other draws give another estimate: the agreement is not an artefact of the check.
    other = bench_gpu.pythae_style_nll(model, x, k, samples_per_call=per_call, seeds=[7, 8])
    assert (other - ours).abs().max() > 1e-3


def test_pythae_style_loop_at_k_1_is_minus_the_one_sample_log_weight():
    """k = 1: -log w = -log p(x|z) - log N(z; 0, I) + log q(z|x), with the float64 densities
    of torch.distributions."""
    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[16], latent_dim=3).eval()
    x = (torch.rand(1, 1, 28, 28) < 0.3).float()
    nll = bench_gpu.pythae_style_nll(model, x, 1, seeds=[3])
    with torch.no_grad():
        mu, logvar = model.encode(x)
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
        z = mu + torch.exp(0.5 * logvar) * eps
        posterior = torch.distributions.Normal(mu.double(), torch.exp(0.5 * logvar).double())
        prior = torch.distributions.Normal(torch.zeros(3).double(), 1.0)
        log_likelihood = -model.reconstruction_nll(model.decode(z), x).double()
        log_w = log_likelihood + prior.log_prob(z.double()).sum(-1)
        log_w = log_w - posterior.log_prob(z.double()).sum(-1)
    assert math.isclose(nll.item(), -log_w.item(), abs_tol=1e-3)


class _Trainer:
    pass


def test_warmed_throughput_counts_only_the_epochs_after_the_first():
    clock = bench_gpu.WarmedThroughput(warmup_epochs=1)
    module = SimpleNamespace(device=torch.device("cpu"))
    batch = (torch.zeros(8, 1, 2, 2),)
    for epoch_batches in (3, 2):
        clock.on_train_epoch_start(_Trainer(), module)
        for index in range(epoch_batches):
            clock.on_train_batch_end(_Trainer(), module, None, batch, index)
        clock.on_train_epoch_end(_Trainer(), module)
    assert clock.samples == 2 * 8
    assert clock.seconds > 0


def test_summary_pairs_rounds_and_tolerates_missing_ones():
    rates = {"bare": {0: 100.0, 1: 200.0}, "fp32": {0: 50.0, 1: 150.0}, "compile": {1: 100.0}}
    peaks = {"bare": {}, "fp32": {}, "compile": {}}
    rows = bench_gpu.summarise_training(rates, peaks, dict.fromkeys(rates, "cmd"))
    assert rows["fp32"]["ratio_to_bare_of_best"] == pytest.approx(150 / 200)
    assert rows["fp32"]["ratio_to_bare_median_of_rounds"] == pytest.approx((0.5 + 0.75) / 2)
    assert rows["compile"]["ratio_to_bare_median_of_rounds"] == pytest.approx(100 / 200)
    assert rows["compile"]["speedup_over_fp32_of_best"] == pytest.approx(100 / 150)
    assert rows["bare"]["peak_memory_mib"] is None


def test_missing_keys_names_only_the_keys_the_config_lacks():
    overrides = ("model.compile=true", "data.no_such_key=1", "trainer.precision=bf16-mixed")
    assert bench_gpu.missing_keys(overrides) == ["data.no_such_key"]


def test_train_variants_use_only_keys_of_the_config():
    for arch in ("mlp", "conv"):
        for overrides in bench_gpu.train_variants(arch).values():
            assert bench_gpu.missing_keys(overrides) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(["--out", str(out)])
    message = str(exit_info.value.code)
    assert "torch.cuda.is_available() is False" in message and "\n" not in message
    assert not out.exists()


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench_gpu, "iw_nll_section", broken)
    monkeypatch.setattr(bench_gpu, "quantizer_section", lambda a, d, record, save: None)
    out = tmp_path / "gpu.json"
    result = bench_gpu.main(
        ["--device", "cpu", "--quick", "--sections", "iw_nll", "quantizer", "--out", str(out)]
    )
    assert result["sections"]["iw_nll"]["status"] == "failed"
    assert "RuntimeError: boom" in result["sections"]["iw_nll"]["error"]
    assert result["sections"]["quantizer"]["status"] == "ok"
    assert out.is_file()


def test_a_section_past_its_hard_limit_is_stopped():
    with pytest.raises(bench_gpu.SectionTimeout):
        with bench_gpu.hard_limit(0.05):
            while True:
                pass


def test_a_variant_whose_key_is_missing_is_skipped_with_a_note(monkeypatch):
    variants = {"fp32": (), "future": ("data.not_yet_added=true",)}
    monkeypatch.setattr(bench_gpu, "train_variants", lambda arch: variants)
    record: dict = {}
    runs = bench_gpu.vae_train_runs("mlp", (), record)
    assert list(runs) == ["fp32"]
    assert "data.not_yet_added" in record["skipped"]["future"]
    assert record["commands"] == {"fp32": "(the experiment's defaults)"}
