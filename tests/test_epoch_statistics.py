"""Epoch statistics as torchmetrics metrics: ActiveUnits, KLPerDimension, CodeUsage.

Each metric is checked against the statistic computed directly on the concatenated data, so
several uneven updates must equal one update on everything; then reset, dtypes, inputs, and two
gloo processes whose compute() gives the statistic of both halves.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vae.eval.active_units import ACTIVE_UNIT_THRESHOLD, active_units, count_active_units
from vae.eval.epoch_statistics import ActiveUnits, CodeUsage, CodeUsageResult, KLPerDimension
from vae.losses import codebook_usage, perplexity

LATENT_DIM = 4
NUM_CODES = 10
BATCH_SIZES = (5, 17, 1, 9, 12)


def posterior_means(generator: torch.Generator) -> torch.Tensor:
    """(sum(BATCH_SIZES), 4) float32 means: offsets up to 100 with variances either side of 0.01.

    Variances 1, 0.0025, 0.04, 0.0064: units 0 and 2 are active. The offset of 100 against a
    variance of 0.04 is where a float32 sum of squares would cancel to nothing.
    """
    offsets = torch.tensor([0.0, 1.0, 100.0, -50.0])
    scales = torch.tensor([1.0, 0.05, 0.2, 0.08])
    rows = torch.randn(sum(BATCH_SIZES), LATENT_DIM, generator=generator)
    return (offsets + scales * rows).float()


def per_example_kl(generator: torch.Generator) -> torch.Tensor:
    """(N, 4) non-negative KL values in nats, of different sizes per dimension."""
    rows = torch.rand(sum(BATCH_SIZES), LATENT_DIM, generator=generator)
    return rows * torch.tensor([3.0, 0.01, 1.0, 0.0])


def code_grids(generator: torch.Generator) -> torch.Tensor:
    """(N, 3, 3) code indices that never use codes 7, 8 and 9."""
    return torch.randint(0, 7, (sum(BATCH_SIZES), 3, 3), generator=generator)


def batches(data: torch.Tensor) -> list[torch.Tensor]:
    return list(data.split(BATCH_SIZES))


def direct_variance(mu: torch.Tensor) -> torch.Tensor:
    """Two-pass population variance in float64: the reference for the running sums."""
    return torch.var(mu.double(), dim=0, correction=0)


def empty_metrics() -> list:
    return [ActiveUnits(LATENT_DIM), KLPerDimension(LATENT_DIM), CodeUsage(NUM_CODES)]


# --- each metric against the direct computation ------------------------------------------------


def test_active_units_over_uneven_batches_equal_the_variance_of_all_examples():
    mu = posterior_means(torch.Generator().manual_seed(0))
    metric = ActiveUnits(LATENT_DIM)
    for batch in batches(mu):
        metric.update(batch)
    whole = ActiveUnits(LATENT_DIM)
    whole.update(mu)

    expected = direct_variance(mu)
    assert metric.variance().dtype == torch.float64
    # float64 sums keep a variance of 0.04 about a mean of 100 to ~1e-11 relatively.
    torch.testing.assert_close(metric.variance(), expected, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(metric.variance(), whole.variance(), rtol=1e-12, atol=0.0)
    assert int(metric.compute()) == int(whole.compute()) == count_active_units(expected) == 2
    assert metric.compute().dtype == torch.int64


def test_active_units_threshold_is_strict_and_configurable():
    mu = posterior_means(torch.Generator().manual_seed(0))
    for threshold, active in [(0.0, 4), (ACTIVE_UNIT_THRESHOLD, 2), (0.5, 1), (10.0, 0)]:
        metric = ActiveUnits(LATENT_DIM, threshold=threshold)
        metric.update(mu)
        assert int(metric.compute()) == active
    constant = ActiveUnits(2, threshold=0.0)
    constant.update(torch.full((3, 2), 7.0))
    assert int(constant.compute()) == 0  # Var = 0 exactly, and 0 > 0 is false


def test_kl_per_dimension_weighs_uneven_batches_by_their_examples():
    kl = per_example_kl(torch.Generator().manual_seed(1))
    metric = KLPerDimension(LATENT_DIM)
    for batch in batches(kl):
        metric.update(batch)
    result = metric.compute()
    assert result.dtype == torch.float64 and result.shape == (LATENT_DIM,)
    torch.testing.assert_close(result, kl.double().mean(0), rtol=1e-12, atol=0.0)
    assert float(result[3]) == 0.0
    # A mean of the batch means would give the batch of one example the weight of seventeen.
    mean_of_means = torch.stack([batch.double().mean(0) for batch in batches(kl)]).mean(0)
    assert not torch.allclose(result, mean_of_means)


def test_code_usage_counts_every_position_and_matches_the_loss_functions():
    indices = code_grids(torch.Generator().manual_seed(2))
    metric = CodeUsage(NUM_CODES)
    for batch in batches(indices):
        metric.update(batch)
    result = metric.compute()
    expected_counts = torch.bincount(indices.flatten(), minlength=NUM_CODES)
    assert isinstance(result, CodeUsageResult)
    assert result.counts.dtype == torch.int64
    assert torch.equal(result.counts, expected_counts)
    assert int(result.counts.sum()) == indices.numel()
    torch.testing.assert_close(result.perplexity, perplexity(expected_counts), rtol=0, atol=0)
    assert float(result.usage) == float(codebook_usage(expected_counts)) == 0.7


def test_code_usage_takes_indices_of_any_integer_shape_and_dtype():
    metric = CodeUsage(3)
    metric.update(torch.tensor(2))
    metric.update(torch.tensor([0, 2], dtype=torch.int32))
    metric.update(torch.tensor([[[1]], [[2]]], dtype=torch.uint8))
    assert metric.compute().counts.tolist() == [1, 1, 3]


def test_forward_returns_the_batch_value_and_still_accumulates_the_epoch():
    mu = posterior_means(torch.Generator().manual_seed(0))
    metric = ActiveUnits(LATENT_DIM, threshold=0.0)
    first, second = mu[:1], mu[1:]
    assert int(metric(first)) == 0  # one example: no variance yet
    metric(second)
    torch.testing.assert_close(metric.variance(), direct_variance(mu), rtol=1e-9, atol=0.0)


# --- reset, empty input, dtypes ----------------------------------------------------------------


def test_compute_before_any_update_raises_a_clear_error():
    for metric in empty_metrics():
        with pytest.warns(UserWarning, match="before the ``update``"):
            with pytest.raises(ValueError, match="call update"):
                metric.compute()
    with pytest.raises(ValueError, match="call update"):
        ActiveUnits(LATENT_DIM).variance()


def test_empty_batches_add_nothing():
    active, kl, codes = empty_metrics()
    active.update(torch.zeros(0, LATENT_DIM))
    kl.update(torch.zeros(0, LATENT_DIM))
    codes.update(torch.zeros(0, 3, 3, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # update was called: torchmetrics does not warn anyway
        for metric in (active, kl, codes):
            with pytest.raises(ValueError, match="call update"):
                metric.compute()


def test_reset_returns_every_metric_to_its_empty_state():
    generator = torch.Generator().manual_seed(3)
    mu, kl, indices = posterior_means(generator), per_example_kl(generator), code_grids(generator)
    metrics = empty_metrics()
    for metric, data in zip(metrics, (mu * 3, kl + 5, indices + 3), strict=True):
        metric.update(data)
        metric.compute()  # cached until the next update or reset
        metric.reset()
        assert metric.update_count == 0
        for name, default in metric._defaults.items():
            assert torch.equal(getattr(metric, name), default)
    # After the reset only the new data counts (and no cached result is returned).
    active, kl_metric, codes = metrics
    active.update(mu)
    kl_metric.update(kl)
    codes.update(indices)
    torch.testing.assert_close(active.variance(), direct_variance(mu), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(kl_metric.compute(), kl.double().mean(0), rtol=1e-12, atol=0.0)
    assert torch.equal(codes.compute().counts, torch.bincount(indices.flatten(), minlength=10))


def test_states_are_float64_sums_and_int64_counts_whatever_the_module_is_cast_to():
    holder = torch.nn.ModuleList(empty_metrics())
    expected = {
        "count": torch.int64,
        "mean_sum": torch.float64,
        "square_sum": torch.float64,
        "kl_sum": torch.float64,
        "counts": torch.int64,
    }

    def state_dtypes():
        return {name: getattr(m, name).dtype for m in holder for name in m._defaults}

    assert state_dtypes() == expected
    # Lightning's "bf16-true" / "16-true" precision calls module.to(dtype) on the whole model.
    for cast in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to("cpu", torch.float16),
        lambda m: m.half(),
        lambda m: m.float(),
    ):
        cast(holder)
        assert state_dtypes() == expected
    with pytest.raises(TypeError, match="dtype is fixed"):
        holder[0].set_dtype(torch.float32)
    # The states are not saved with the model: checkpoints keep their keys.
    assert holder.state_dict() == {}


def test_a_metric_reset_inside_inference_mode_can_be_updated_outside_it():
    # Lightning resets at the end of a validation epoch, inside torch.inference_mode().
    mu = posterior_means(torch.Generator().manual_seed(0))
    active, kl, codes = empty_metrics()
    with torch.inference_mode():
        for metric, data in ((active, mu), (kl, mu.abs()), (codes, mu.long().clamp(0, 9))):
            metric.update(data)
            metric.reset()
    active.update(mu)
    kl.update(mu.abs())
    codes.update(torch.tensor([1, 2]))
    assert int(active.compute()) == 2


def test_updates_do_not_keep_the_autograd_graph():
    mu = torch.randn(6, LATENT_DIM, requires_grad=True)
    active, kl, _ = empty_metrics()
    active.update(mu * 2)
    kl.update(mu.square())
    assert not active.square_sum.requires_grad and not kl.kl_sum.requires_grad


@pytest.mark.parametrize(
    "make, bad, message",
    [
        (lambda: ActiveUnits(LATENT_DIM), torch.zeros(3, LATENT_DIM + 1), "shape"),
        (lambda: ActiveUnits(LATENT_DIM), torch.zeros(LATENT_DIM), "shape"),
        (lambda: ActiveUnits(LATENT_DIM), torch.zeros(3, LATENT_DIM, dtype=torch.long), "float"),
        (lambda: KLPerDimension(LATENT_DIM), torch.zeros(2, 3, LATENT_DIM), "shape"),
        (lambda: CodeUsage(NUM_CODES), torch.tensor([0.0, 1.0]), "integer"),
        (lambda: CodeUsage(NUM_CODES), torch.tensor([True]), "integer"),
        (lambda: CodeUsage(NUM_CODES), torch.tensor([0, NUM_CODES]), r"\[0, 10\)"),
        (lambda: CodeUsage(NUM_CODES), torch.tensor([-1, 3]), r"\[0, 10\)"),
    ],
)
def test_bad_updates_are_refused_and_leave_the_state_alone(make, bad, message):
    metric = make()
    with pytest.raises(ValueError, match=message):
        metric.update(bad)
    for name, default in metric._defaults.items():
        assert torch.equal(getattr(metric, name), default)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ActiveUnits(0), "latent_dim"),
        (lambda: ActiveUnits(2.0), "latent_dim"),
        (lambda: ActiveUnits(2, threshold=-0.1), "threshold"),
        (lambda: ActiveUnits(2, threshold=float("nan")), "threshold"),
        (lambda: KLPerDimension(True), "latent_dim"),
        (lambda: CodeUsage(-3), "num_codes"),
    ],
)
def test_bad_sizes_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- the plain function keeps its behaviour ----------------------------------------------------


class _MeansOnly(torch.nn.Module):
    """encode(x) -> (x, zeros): the posterior means are the inputs themselves."""

    def encode(self, x: torch.Tensor):
        return x, torch.zeros_like(x)


def test_active_units_function_counts_over_all_batches():
    mu = posterior_means(torch.Generator().manual_seed(0))
    count, variance = active_units(_MeansOnly(), batches(mu))
    assert count == 2 and isinstance(count, int)
    torch.testing.assert_close(variance, direct_variance(mu), rtol=1e-9, atol=0.0)
    assert active_units(_MeansOnly(), batches(mu), threshold=0.5)[0] == 1
    with pytest.raises(ValueError, match="empty"):
        active_units(_MeansOnly(), [])


# --- distributed: two gloo processes -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, halves: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        active, kl, codes = empty_metrics()
        for metric, name in ((active, "mu"), (kl, "kl"), (codes, "indices")):
            for batch in halves[name][rank]:  # a different number of uneven batches per rank
                metric.update(batch)
        only_rank_zero = CodeUsage(NUM_CODES)  # rank 1 never updates: still no error, no hang
        if rank == 0:
            only_rank_zero.update(halves["indices"][0][0])
        no_data_anywhere = KLPerDimension(LATENT_DIM)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            only_rank_zero_counts = only_rank_zero.compute().counts
            try:
                no_data_anywhere.compute()
                raised = False
            except ValueError:
                raised = True
        codes_result = codes.compute()
        results[rank] = {
            "active": int(active.compute()),
            "variance": active.variance(),
            "kl": kl.compute(),
            "counts": codes_result.counts,
            "perplexity": codes_result.perplexity,
            "usage": codes_result.usage,
            "only_rank_zero_counts": only_rank_zero_counts,
            "raised_with_no_data": raised,
            # compute() syncs into a copy: the local sums go on accumulating this rank's data.
            "local_count": int(active.count),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built here")
@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_two_gloo_processes_compute_the_statistics_of_both_halves():
    generator = torch.Generator().manual_seed(4)
    mu, kl, indices = posterior_means(generator), per_example_kl(generator), code_grids(generator)
    split = 23  # rank 0: batches of 5, 17 and 1; rank 1: batches of 9 and 12

    def halves_of(data):
        return [batches(data)[:3], batches(data)[3:]]

    halves = {"mu": halves_of(mu), "kl": halves_of(kl), "indices": halves_of(indices)}
    assert sum(b.shape[0] for b in halves["mu"][0]) == split

    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), halves, results),
        nprocs=2,
        join=True,
        start_method="fork",  # the children inherit the imports: spawn re-imports for ~10 s
    )
    expected_counts = torch.bincount(indices.flatten(), minlength=NUM_CODES)
    for rank in (0, 1):
        result = results[rank]
        torch.testing.assert_close(result["variance"], direct_variance(mu), rtol=1e-9, atol=0.0)
        assert result["active"] == 2
        torch.testing.assert_close(result["kl"], kl.double().mean(0), rtol=1e-12, atol=0.0)
        assert torch.equal(result["counts"], expected_counts)
        torch.testing.assert_close(result["perplexity"], perplexity(expected_counts))
        assert float(result["usage"]) == 0.7
        assert torch.equal(
            result["only_rank_zero_counts"],
            torch.bincount(halves["indices"][0][0].flatten(), minlength=NUM_CODES),
        )
        assert result["raised_with_no_data"]
    assert results[0]["local_count"] == split
    assert results[1]["local_count"] == mu.shape[0] - split
