"""VectorQuantizer and the VQ terms: search, gradients, EMA, restarts, perplexity, precision, DDP."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vae.losses import codebook_usage, perplexity, uniform_prior_rate, vq_losses
from vae.nn import (
    VectorQuantizer,
    ema_codebook_update,
    kmeans,
    laplace_smoothed_counts,
    nearest_codes,
)


def channels_first(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) rows as a (1, D, N) channels-first batch of one example."""
    return rows.t().unsqueeze(0).contiguous()


def set_codebook(quantizer: VectorQuantizer, codes) -> None:
    codes = torch.as_tensor(codes, dtype=torch.float32)
    quantizer._set_codes(torch.arange(codes.shape[0]), codes)


# --- nearest-code search -----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 999, 1000, 5000])
def test_nearest_codes_equal_cdist_argmin_across_chunk_boundaries(chunk_size):
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(1000, 5, generator=generator, dtype=torch.float64)
    codebook = torch.randn(37, 5, generator=generator, dtype=torch.float64)
    expected = torch.cdist(points, codebook).argmin(1)
    assert torch.equal(nearest_codes(points, codebook, chunk_size), expected)


def test_forward_indices_equal_brute_force_in_float32():
    torch.manual_seed(1)
    quantizer = VectorQuantizer(50, 8, chunk_size=100).eval()
    set_codebook(quantizer, torch.randn(50, 8))
    z = torch.randn(4, 8, 9, 7)  # 252 rows: two full chunks and a partial one
    out = quantizer(z)
    rows = z.movedim(1, -1).reshape(-1, 8)
    expected = torch.cdist(rows.double(), quantizer.codebook.double()).argmin(1)
    assert out.indices.shape == (4, 9, 7)
    assert torch.equal(out.indices.reshape(-1), expected)
    assert torch.equal(out.quantized.movedim(1, -1).reshape(-1, 8), quantizer.codebook[expected])


def test_search_ignores_the_norm_of_z_but_not_the_norm_of_codes():
    # A long code pointing the same way as z is farther than a short one: ||e||^2 matters.
    quantizer = VectorQuantizer(2, 2).eval()
    set_codebook(quantizer, [[1.0, 0.0], [10.0, 0.0]])
    out = quantizer(channels_first(torch.tensor([[2.0, 0.0], [7.0, 0.0]])))
    assert out.indices.tolist() == [[0, 1]]


def squared_distances_float64(points: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) sum_d (z_nd - e_kd)^2 in float64: the brute force the search must agree with."""
    codes = codebook.double().unsqueeze(0)
    return torch.cat(
        [(rows.double().unsqueeze(1) - codes).square().sum(-1) for rows in points.split(128)]
    )


def assert_nearest_up_to_float64_ties(chosen, points, codebook):
    """Each chosen code is a float64 nearest one, or ties with it to float64 rounding."""
    distances = squared_distances_float64(points, codebook)
    nearest = distances.amin(1)
    excess = distances.gather(1, chosen.unsqueeze(1)).squeeze(1) - nearest
    float64_rounding = 4 * (codebook.shape[1] + 1) * 2.0**-53 * nearest
    assert bool((excess <= float64_rounding).all()), (
        f"{int((excess > float64_rounding).sum())} of {chosen.numel()} rows chose a farther "
        f"code, by up to {float(excess.max())}"
    )


@pytest.mark.parametrize("offset", [50.0, 1e3])
def test_nearest_codes_are_exact_far_from_the_origin(offset):
    # Latents and codes around (offset, ..., offset): an uncentred float32 search of
    # ||e||^2 - 2 z.e cancels ~offset^2 D away and swaps 20 (offset 50) and 3918 (1e3) of the
    # 5000 choices.
    generator = torch.Generator().manual_seed(0)
    points = offset + torch.randn(5000, 64, generator=generator)
    codebook = offset + torch.randn(256, 64, generator=generator)
    chosen = nearest_codes(points, codebook)
    assert_nearest_up_to_float64_ties(chosen, points, codebook)


def test_nearest_codes_are_exact_near_ties_included():
    # Codes 1e-3 apart, far from the origin: float32 scores cannot rank many rows, so most go
    # through the float64 re-ranking, across chunk boundaries.
    generator = torch.Generator().manual_seed(1)
    codebook = 20.0 + 1e-3 * torch.randn(100, 8, generator=generator)
    points = 20.0 + 1e-3 * torch.randn(3000, 8, generator=generator)
    for chunk_size in (7, 4096):
        assert_nearest_up_to_float64_ties(
            nearest_codes(points, codebook, chunk_size), points, codebook
        )


def test_exact_ties_go_to_the_lowest_index_across_search_groups():
    # Code 40 (in another group of SEARCH_GROUP columns than code 3) duplicates code 3, and
    # codes 3 and 70 are mirror images about the points' hyperplane x_0 = 50: every point is
    # exactly as far from 3, 40 and 70, and nearer to them than to any other code.
    generator = torch.Generator().manual_seed(2)
    codebook = 50.0 + 10.0 + torch.randn(100, 4, generator=generator)
    codebook[3] = torch.tensor([49.0, 50.0, 50.0, 50.0])
    codebook[40] = codebook[3]
    codebook[70] = torch.tensor([51.0, 50.0, 50.0, 50.0])
    points = torch.full((50, 4), 50.0)
    points[:, 1:] += torch.linspace(-0.25, 0.25, 50).unsqueeze(1)
    assert nearest_codes(points, codebook).tolist() == [3] * 50


def test_the_float64_re_ranking_alone_gives_the_brute_force_answer(monkeypatch):
    # With u = 1 every code is a candidate for every row: the answer comes from the re-ranking
    # only, its candidate pairs split into many slices (chunk_size * K / (2 D) = 12 pairs each).
    import vae.nn.quantizer as quantizer_module

    monkeypatch.setattr(quantizer_module, "matmul_unit_roundoff", lambda dtype, device: 1.0)
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(200, 6, generator=generator)
    codebook = torch.randn(37, 6, generator=generator)
    chosen = nearest_codes(points, codebook, chunk_size=4)
    assert torch.equal(chosen, squared_distances_float64(points, codebook).argmin(1))


def test_the_unit_roundoff_follows_the_float32_matmul_precision():
    from vae.nn.quantizer import matmul_unit_roundoff

    cpu = torch.device("cpu")
    assert matmul_unit_roundoff(torch.float64, cpu) == 2.0**-53
    assert matmul_unit_roundoff(torch.float32, cpu) == 2.0**-24
    try:
        torch.set_float32_matmul_precision("medium")
        assert matmul_unit_roundoff(torch.float32, cpu) == 2.0**-8
        assert matmul_unit_roundoff(torch.float64, cpu) == 2.0**-53
    finally:
        torch.set_float32_matmul_precision("highest")
    assert matmul_unit_roundoff(torch.float32, cpu) == 2.0**-24


def test_nearest_codes_refuse_mixed_or_half_dtypes():
    with pytest.raises(ValueError, match="float32 or both float64"):
        nearest_codes(torch.zeros(3, 2), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 or both float64"):
        nearest_codes(torch.zeros(3, 2).bfloat16(), torch.zeros(4, 2).bfloat16())


# --- losses and gradients ----------------------------------------------------------------------


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    torch.manual_seed(2)
    quantizer = VectorQuantizer(16, 4).eval()
    z = torch.randn(3, 4, 5, 5, requires_grad=True)
    upstream = torch.randn(3, 4, 5, 5)
    (quantizer(z).quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert quantizer.codebook.grad is None  # the decoder path never reaches the codebook


@pytest.mark.parametrize("beta", [0.25, 0.0, 2.0])
def test_encoder_gets_recon_plus_beta_commitment_and_codebook_gets_only_its_term(beta):
    torch.manual_seed(3)
    batch = 3
    quantizer = VectorQuantizer(6, 4, commitment=beta).eval()
    z = torch.randn(batch, 4, 2, 5, requires_grad=True)
    upstream = torch.randn(batch, 4, 2, 5)  # stands for d(recon)/d(quantized)
    out = quantizer(z)
    ((out.quantized * upstream).sum() + out.loss).backward()

    rows = z.detach().movedim(1, -1).reshape(-1, 4)
    codes = quantizer.codebook.detach()[out.indices.reshape(-1)]
    # d/dz [beta * sum||z - sg(e)||^2 / B] = 2 beta (z - e) / B
    commitment_grad = (2 * beta / batch * (rows - codes)).reshape(batch, 2, 5, 4).movedim(-1, 1)
    torch.testing.assert_close(z.grad, upstream + commitment_grad)
    # d/de_k [sum||sg(z) - e||^2 / B] = sum over rows assigned to k of 2 (e_k - z_n) / B
    expected = torch.zeros(6, 4).index_add_(0, out.indices.reshape(-1), 2 / batch * (codes - rows))
    torch.testing.assert_close(quantizer.codebook.grad, expected)


def test_loss_values_and_beta_on_the_commitment_term():
    quantizer = VectorQuantizer(1, 2, commitment=0.25).eval()
    set_codebook(quantizer, [[0.0, 0.0]])
    z = torch.tensor([[[3.0], [4.0]], [[0.0], [1.0]]])  # 2 examples, 1 position each
    out = quantizer(z)
    # ||z - e||^2 per example: (25 + 1) / 2 = 13
    assert out.codebook_loss.item() == pytest.approx(13.0)
    assert out.commitment_loss.item() == pytest.approx(13.0)
    assert out.loss.item() == pytest.approx(13.0 + 0.25 * 13.0)


def test_ema_drops_the_codebook_term_and_keeps_the_codebook_out_of_autograd():
    quantizer = VectorQuantizer(4, 3, commitment=0.5, ema=True).eval()
    z = torch.randn(2, 3, 4, requires_grad=True)
    out = quantizer(z)
    assert out.codebook_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(0.5 * out.commitment_loss.item())
    assert not quantizer.codebook.requires_grad
    assert "codebook" not in dict(quantizer.named_parameters())


def test_vq_losses_route_gradients_to_one_side_each():
    z = torch.randn(2, 3, requires_grad=True)
    e = torch.randn(2, 3, requires_grad=True)
    codebook, commitment = vq_losses(z, e)
    codebook.backward(retain_graph=True)
    assert z.grad is None and e.grad is not None
    e.grad = None
    commitment.backward()
    assert e.grad is None and z.grad is not None
    with pytest.raises(ValueError, match="same shape"):
        vq_losses(z, e[:1])


# --- EMA -----------------------------------------------------------------------------------------


def test_ema_update_equals_a_hand_computation_on_three_codes():
    quantizer = VectorQuantizer(3, 2, ema=True, decay=0.5, eps=0.1, dead_code_threshold=None)
    set_codebook(quantizer, [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])  # N = 1, M = e per code
    quantizer.train()
    z = channels_first(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [9.0, 1.0]]))
    out = quantizer(z)

    assert out.indices.tolist() == [[0, 0, 1]]
    # The output uses the codebook from before this step's update.
    assert out.quantized[0].t().tolist() == [[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]]
    # n = [2, 1, 0], m = [[0, 0], [9, 1], [0, 0]]; N = 0.5 * 1 + 0.5 * n; M = 0.5 * e + 0.5 * m
    assert quantizer.ema_counts.tolist() == [1.5, 1.0, 0.5]
    assert quantizer.ema_embed_sum.tolist() == [[0.0, 0.0], [9.5, 0.5], [0.0, 5.0]]
    # N~ = (N + 0.1) / (3 + 3 * 0.1) * 3 = [16, 11, 6] / 11; e = M / N~
    smoothed = torch.tensor([16.0, 11.0, 6.0]) / 11.0
    expected = torch.tensor([[0.0, 0.0], [9.5, 0.5], [0.0, 5.0]]) / smoothed[:, None]
    torch.testing.assert_close(quantizer.codebook, expected)
    torch.testing.assert_close(quantizer.codebook[2], torch.tensor([0.0, 55.0 / 6.0]))


def test_laplace_smoothing_keeps_every_count_positive_and_the_total():
    counts = torch.tensor([0.0, 0.0, 5.0, 3.0])
    smoothed = laplace_smoothed_counts(counts, eps=1e-5)
    assert bool((smoothed > 0).all())
    torch.testing.assert_close(smoothed.sum(), counts.sum())


def test_a_long_unused_code_never_divides_by_zero():
    ema_counts = torch.ones(3)
    ema_embed_sum = torch.ones(3, 2)
    batch_counts = torch.tensor([4.0, 0.0, 0.0])
    batch_sums = torch.tensor([[4.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    for _ in range(2_000):  # 0.9^2000 is far below the smallest float32
        codebook = ema_codebook_update(
            ema_counts, ema_embed_sum, batch_counts, batch_sums, 0.9, 1e-5
        )
    assert ema_counts[1].item() < 1e-40
    assert bool(torch.isfinite(codebook).all())
    torch.testing.assert_close(codebook[0], torch.ones(2), rtol=1e-4, atol=1e-4)


# --- dead codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [True, False])
def test_a_dead_code_is_revived_after_the_threshold(ema):
    torch.manual_seed(4)
    quantizer = VectorQuantizer(4, 2, ema=ema, dead_code_threshold=3)
    set_codebook(quantizer, [[0.0, 0.0], [100.0, 100.0], [-100.0, -100.0], [50.0, -50.0]])
    quantizer.train()
    rows = torch.tensor([[0.5, 0.0], [0.0, 0.5], [1.0, 1.0], [-0.5, 0.2]])
    z = channels_first(rows)
    dead = [int(quantizer(z).dead_codes) for _ in range(3)]
    assert dead == [0, 0, 3]
    assert quantizer.num_restarted.item() == 3
    for code in quantizer.codebook[1:]:
        assert any(torch.equal(code, row) for row in rows), "re-seeded from the encoder outputs"
    assert quantizer.steps_since_used.tolist() == [0, 0, 0, 0]
    if ema:
        assert quantizer.ema_counts[1:].tolist() == [1.0, 1.0, 1.0]
        torch.testing.assert_close(quantizer.ema_embed_sum[1:], quantizer.codebook[1:])
    # The revived codes sit on data now, so they are chosen again.
    assert len(quantizer(z).indices.unique()) > 1


def test_without_restarts_dead_codes_are_counted_and_left_alone():
    quantizer = VectorQuantizer(3, 2, ema=True, dead_code_threshold=2, restart_dead_codes=False)
    set_codebook(quantizer, [[0.0, 0.0], [100.0, 100.0], [-100.0, -100.0]])
    quantizer.train()
    z = channels_first(torch.tensor([[0.1, 0.0], [0.0, 0.1]]))
    dead = [int(quantizer(z).dead_codes) for _ in range(4)]
    assert dead == [0, 2, 2, 2]
    assert quantizer.num_restarted.item() == 0
    assert quantizer.steps_since_used.tolist() == [0, 4, 4]


def test_eval_mode_changes_no_state():
    quantizer = VectorQuantizer(3, 2, ema=True, dead_code_threshold=1)
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer.eval()(torch.randn(2, 2, 3))
    for key, value in quantizer.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- k-means init -------------------------------------------------------------------------------


def test_kmeans_init_finds_separated_clusters_once():
    torch.manual_seed(5)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    rows = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    quantizer = VectorQuantizer(3, 2, ema=True, kmeans_init=True, kmeans_iters=10)
    assert not bool(quantizer.initialised)
    quantizer.train()(channels_first(rows))
    assert bool(quantizer.initialised)
    # Each true centre has a code within 0.1 (and so each code has its own cluster).
    distances = torch.cdist(centres, quantizer.codebook)
    assert distances.min(1).values.max().item() < 0.1
    assert sorted(distances.argmin(1).tolist()) == [0, 1, 2]
    # The flag travels in the state dict, so a loaded model does not redo k-means.
    loaded = VectorQuantizer(3, 2, ema=True, kmeans_init=True)
    loaded.load_state_dict(quantizer.state_dict())
    assert bool(loaded.initialised)


def test_kmeans_keeps_the_centre_of_an_empty_cluster():
    points = torch.zeros(5, 2)
    centres = kmeans(points, 3, iters=3)
    assert centres.shape == (3, 2) and bool(torch.isfinite(centres).all())


# --- perplexity and usage -----------------------------------------------------------------------


def test_perplexity_is_k_for_uniform_use_and_one_for_a_single_code():
    assert perplexity(torch.full((7,), 3.0)).item() == pytest.approx(7.0)
    assert perplexity(torch.tensor([0.0, 9.0, 0.0])).item() == pytest.approx(1.0)
    counts = torch.tensor([5.0, 1.0, 0.0, 2.0])
    expected = math.exp(-sum(p * math.log(p) for p in (5 / 8, 1 / 8, 2 / 8)))
    assert perplexity(counts).item() == pytest.approx(expected)


def test_perplexity_lies_in_one_to_k_for_random_histograms():
    generator = torch.Generator().manual_seed(6)
    for _ in range(50):
        counts = torch.randint(0, 5, (16,), generator=generator).float()
        counts[0] += 1
        value = perplexity(counts).item()
        assert 1.0 - 1e-9 <= value <= 16.0 + 1e-9


def test_epoch_histogram_differs_from_per_batch_perplexity():
    # Two batches each use one code: each batch has perplexity 1, the epoch has 2.
    first, second = torch.tensor([4.0, 0.0]), torch.tensor([0.0, 4.0])
    assert perplexity(first).item() == perplexity(second).item() == pytest.approx(1.0)
    assert perplexity(first + second).item() == pytest.approx(2.0)
    assert codebook_usage(first + second).item() == 1.0
    assert codebook_usage(torch.tensor([1.0, 0.0, 0.0, 3.0])).item() == 0.5


def test_forward_perplexity_matches_the_batch_histogram():
    quantizer = VectorQuantizer(8, 3).eval()
    out = quantizer(torch.randn(4, 3, 6))
    counts = torch.bincount(out.indices.reshape(-1), minlength=8).float()
    assert torch.equal(out.counts, counts)
    assert out.perplexity.item() == pytest.approx(perplexity(counts).item(), rel=1e-6)


def test_bad_histograms_raise():
    with pytest.raises(ValueError, match="at least one use"):
        perplexity(torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        codebook_usage(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="1-D"):
        perplexity(torch.ones(2, 2))


def test_uniform_prior_rate_is_positions_times_log_k():
    assert uniform_prior_rate(49, 512) == pytest.approx(49 * math.log(512))


# --- precision ----------------------------------------------------------------------------------


def test_bf16_autocast_gives_the_float32_results():
    torch.manual_seed(7)
    quantizer = VectorQuantizer(256, 16, ema=True).eval()
    # Codes close together, so that a bf16 search would choose differently.
    set_codebook(quantizer, 3.0 + 0.05 * torch.randn(256, 16))
    z = 3.0 + 0.05 * torch.randn(8, 16, 6, 6)
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = quantizer(z)
        mixed_bf16_input = quantizer(z.bfloat16())
        bf16_scores = torch.addmm(
            quantizer.codebook.pow(2).sum(1),
            z.movedim(1, -1).reshape(-1, 16),
            quantizer.codebook.t(),
            alpha=-2,
        )
    assert bf16_scores.dtype == torch.bfloat16
    assert (bf16_scores.float().argmin(1) != reference.indices.reshape(-1)).float().mean() > 0.1
    assert mixed.quantized.dtype == torch.float32
    assert torch.equal(mixed.indices, reference.indices)
    assert torch.equal(mixed.quantized, reference.quantized)
    assert torch.equal(mixed.loss, reference.loss)
    expected = quantizer(z.bfloat16().float())
    assert torch.equal(mixed_bf16_input.indices, expected.indices)


# --- argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_codes": 0}, "num_codes"),
        ({"code_dim": -1}, "code_dim"),
        ({"decay": 1.0}, "decay"),
        ({"commitment": -0.1}, "commitment"),
        ({"eps": 0.0}, "eps"),
        ({"dead_code_threshold": 0}, "dead_code_threshold"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    arguments = {"num_codes": 4, "code_dim": 2, **kwargs}
    with pytest.raises(ValueError, match=f"VectorQuantizer: argument '{match}'"):
        VectorQuantizer(**arguments)


def test_wrong_channels_say_what_was_expected():
    quantizer = VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match="code_dim=3"):
        quantizer(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        quantizer(torch.ones(2, 3, 4, dtype=torch.long))


# --- distributed: two gloo processes --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial codebook on both ranks
        quantizer = VectorQuantizer(5, 2, ema=True, decay=0.5, dead_code_threshold=2).train()
        set_codebook(quantizer, [[0, 0], [5, 0], [50, 50], [-50, 50], [50, -50]])
        torch.manual_seed(100 + rank)  # different data and restart draws per rank
        for _ in range(3):
            rows = torch.randn(5, 2) + torch.tensor([[5.0 * rank, 0.0]])
            out = quantizer(channels_first(rows))
        results[rank] = {
            "codebook": quantizer.codebook.clone(),
            "ema_counts": quantizer.ema_counts.clone(),
            "restarted": int(quantizer.num_restarted),
            "dead": int(out.dead_codes),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built here")
def test_two_gloo_processes_keep_identical_codebooks_and_sum_statistics():
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True, start_method="spawn"
    )
    first, second = results[0], results[1]
    assert torch.equal(first["codebook"], second["codebook"])
    assert torch.equal(first["ema_counts"], second["ema_counts"])
    # Codes 2-4 are far from both ranks' data: dead after 2 steps, re-seeded identically.
    assert first["restarted"] == second["restarted"] == 3
    # The EMA counts see 5 + 5 = 10 rows per step only if the ranks' counts are summed:
    # total 5 -> 0.5 * 5 + 0.5 * 10 = 7.5 -> 8.75, restarts reset three counts of 0.25 to 1
    # (+2.25) -> 11 -> 0.5 * 11 + 0.5 * 10 = 10.5. Per-rank counts (5 rows) would give 5.5.
    assert first["ema_counts"].sum().item() == pytest.approx(10.5, rel=1e-5)
