"""IW-NLL throughput against the GEMM-bound floor (CPU).

Model: the ``vae_fashion`` Gaussian VAE (MLP 784-512-16, Bernoulli likelihood), untrained but
seeded: speed does not depend on the weights. Inputs: binarised Fashion-MNIST test images when
the dataset is installed, else Bernoulli(0.3) noise of the same shape.

* measured: examples per second of ``vae.eval.importance_weighted_nll`` at k = 1000;
* floor: the decoder's matrix-multiply FLOPs per example, k * 2 * (16*512 + 512*784), divided by
  the matmul rate measured on the same CPU with the same threads. Two rates are measured: the
  decoder's own two GEMMs at the chunk's row count (``addmm`` into preallocated outputs, bias
  included) and a square 2048^3 ``torch.mm``; the headline uses the *higher* rate, i.e. the
  stricter floor.

Matmul rate and IW-NLL are measured in alternation ``--repeats`` times; the report gives the
best (least disturbed by other processes) and the median of each, and their ratios.

    python benchmarks/bench_iw_nll.py [--k 1000] [--batch-size 64] [--rows 3072] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae.eval.nll import DEFAULT_ROWS_PER_CHUNK, importance_weighted_nll  # noqa: E402
from vae.models import GaussianVAE  # noqa: E402

LATENT, HIDDEN, PIXELS = 16, 512, 784
DECODER_FLOPS = 2 * (LATENT * HIDDEN + HIDDEN * PIXELS)  # per decoded sample (multiply + add)


def inputs(batch_size: int) -> tuple[torch.Tensor, str]:
    try:
        from vae.data import FashionMNISTDataModule

        datamodule = FashionMNISTDataModule(binarize="dynamic")
        datamodule.setup()
        return datamodule.test_split.images[:batch_size], "fashion_mnist test (binarised)"
    except Exception:  # the dataset is optional here; the speed is the same on noise
        generator = torch.Generator().manual_seed(0)
        images = torch.bernoulli(torch.full((batch_size, 1, 28, 28), 0.3), generator=generator)
        return images, "Bernoulli(0.3) noise"


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decoder_gemm_rate(model: GaussianVAE, rows: int) -> float:
    """FLOP/s of the decoder's two linear layers at ``rows`` rows: ``addmm`` into outputs that
    are allocated once, so the rate is the multiply's alone (no first-touch page faults)."""
    first, second = model.decoder.net[0], model.decoder.net[2]
    z = torch.randn(rows, LATENT)
    hidden = torch.relu(torch.randn(rows, HIDDEN))
    out_hidden, out_pixels = torch.empty(rows, HIDDEN), torch.empty(rows, PIXELS)

    @torch.no_grad()
    def gemms():
        torch.addmm(first.bias, z, first.weight.t(), out=out_hidden)
        torch.addmm(second.bias, hidden, second.weight.t(), out=out_pixels)

    return rows * DECODER_FLOPS / best_time(gemms, 10)


def square_gemm_rate(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--rows",
        type=int,
        default=DEFAULT_ROWS_PER_CHUNK["cpu"],
        help="decoder rows per call (chunk_size = rows // batch size)",
    )
    parser.add_argument("--batches", type=int, default=1, help="batches per timing")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "iw_nll.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[HIDDEN], latent_dim=LATENT).eval()
    x, source = inputs(args.batch_size)
    chunk_size = max(1, args.rows // args.batch_size)
    rows = chunk_size * args.batch_size
    load_before = os.getloadavg()

    def iw_nll():
        for _ in range(args.batches):
            importance_weighted_nll(model, x, args.k, chunk_size)

    importance_weighted_nll(model, x, min(args.k, 2 * chunk_size), chunk_size)  # warm-up
    measured, decoder_rates, square_rates = [], [], []
    for repeat in range(args.repeats):
        decoder_rates.append(decoder_gemm_rate(model, rows))
        square_rates.append(square_gemm_rate())
        start = time.perf_counter()
        iw_nll()
        measured.append(args.batches * args.batch_size / (time.perf_counter() - start))
        print(
            f"repeat {repeat}: {measured[-1]:.2f} examples/s; matmul {decoder_rates[-1] / 1e9:.1f} "
            f"GFLOP/s (decoder shapes), {square_rates[-1] / 1e9:.1f} GFLOP/s (2048^3)",
            flush=True,
        )

    flops_per_example = args.k * DECODER_FLOPS

    def summary(values):
        return {"best": max(values), "median": statistics.median(values), "all": values}

    rate = {
        "decoder_shapes": summary(decoder_rates),
        "square_2048": summary(square_rates),
    }
    headline_rate = max(rate["decoder_shapes"]["best"], rate["square_2048"]["best"])
    headline_median_rate = max(rate["decoder_shapes"]["median"], rate["square_2048"]["median"])
    result = {
        "benchmark": "iw_nll",
        "setup": "vae_fashion MLP 784-512-16, Bernoulli, untrained (seeded)",
        "inputs": source,
        "k": args.k,
        "batch_size": args.batch_size,
        "chunk_size": chunk_size,
        "decoder_rows_per_call": rows,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "decoder_flops_per_example": flops_per_example,
        "examples_per_s": summary(measured),
        "matmul_flops_per_s": rate,
        "floor_examples_per_s": {
            "best": headline_rate / flops_per_example,
            "median": headline_median_rate / flops_per_example,
        },
        "fraction_of_floor": {
            "best_vs_best": max(measured) / (headline_rate / flops_per_example),
            "median_vs_median": statistics.median(measured)
            / (headline_median_rate / flops_per_example),
        },
        "target_fraction": 0.8,
    }
    print(
        json.dumps(
            {k: result[k] for k in ("examples_per_s", "floor_examples_per_s", "fraction_of_floor")},
            indent=2,
        )
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
