"""IW-NLL throughput on CPU: the current version, optionally another one, and a GEMM-bound floor.

Model: the ``vae_fashion`` Gaussian VAE (MLP 784-512-16, Bernoulli likelihood), untrained but
seeded: speed does not depend on the weights. Inputs: binarised Fashion-MNIST test images when
the dataset is installed, else Bernoulli(0.3) noise of the same shape.

* current: examples per second of ``vae.eval.importance_weighted_nll`` at k = 1000;
* baseline (``--baseline FILE``): the ``importance_weighted_nll`` of another file, e.g. an older
  version (``git show REV:vae/eval/nll.py > /tmp/old_nll.py``); the report gives its speed-up
  over the current one. This is how a speed path is judged: issue 13 keeps one only if it buys
  >= 1.5x over the plain version on a workload a user runs;
* floor: the decoder's matrix-multiply FLOPs per example, k * 2 * (16*512 + 512*784), divided by
  the best rate of a square 2048^3 ``torch.mm`` on the same CPU with the same threads.

Each IW-NLL timing runs in a fresh process, as ``vae-eval`` would: in one process, what one
version leaves in the C allocator changes the other's page faults (the plain version measured
1.4x slower right after the buffer-reusing one than alone). Versions and the floor alternate
``--repeats`` times. Each timing reports examples per wall-clock second and per CPU second of
the timed process; on a shared machine with one thread the CPU figure is the steadier one.

    python benchmarks/bench_iw_nll.py [--k 1000] [--batch-size 64] [--rows 3072] [--repeats 5]
                                      [--threads 1] [--baseline FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae.eval.nll import DEFAULT_ROWS_PER_CHUNK  # noqa: E402

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


def time_one(args) -> None:
    """In a fresh process: time ``args.implementation`` ("current" or a file), print JSON."""
    from vae.models import GaussianVAE

    if args.implementation == "current":
        from vae.eval.nll import importance_weighted_nll
    else:
        spec = importlib.util.spec_from_file_location("baseline_nll", args.implementation)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        importance_weighted_nll = module.importance_weighted_nll
    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[HIDDEN], latent_dim=LATENT).eval()
    x, source = inputs(args.batch_size)
    chunk_size = max(1, args.rows // args.batch_size)
    importance_weighted_nll(model, x, min(args.k, 2 * chunk_size), chunk_size)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    importance_weighted_nll(model, x, args.k, chunk_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"wall": args.batch_size / wall, "cpu": args.batch_size / cpu, "inputs": source}
    print(json.dumps(result))


def square_gemm_rate(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    start = time.perf_counter()
    torch.mm(a, b)
    return 2 * n**3 / (time.perf_counter() - start)


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--baseline", default=None, help="file with another importance_weighted_nll"
    )
    parser.add_argument("--implementation", default=None, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "iw_nll.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.implementation:
        time_one(args)
        return

    def run(implementation: str) -> dict:
        command = [sys.executable, __file__, "--implementation", implementation]
        for name in ("k", "batch_size", "rows", "threads"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, env=environment
        )
        return json.loads(output.stdout.splitlines()[-1])

    versions = {"current": "current"}
    if args.baseline:
        versions["baseline"] = str(Path(args.baseline).resolve())
    load_before = os.getloadavg()
    timings: dict[str, list[dict]] = {name: [] for name in versions}
    square_rates = []
    for repeat in range(args.repeats):
        square_rates.append(square_gemm_rate())
        line = f"repeat {repeat}: matmul {square_rates[-1] / 1e9:.1f} GFLOP/s"
        for name, implementation in versions.items():
            timings[name].append(run(implementation))
            line += f"; {name} {timings[name][-1]['wall']:.1f} ({timings[name][-1]['cpu']:.1f} cpu)"
        print(line + " examples/s", flush=True)

    def summary(values):
        return {"best": max(values), "median": statistics.median(values), "all": values}

    flops_per_example = args.k * DECODER_FLOPS
    examples_per_s = {
        name: {clock: summary([t[clock] for t in runs]) for clock in ("wall", "cpu")}
        for name, runs in timings.items()
    }
    floor = max(square_rates) / flops_per_example
    result = {
        "benchmark": "iw_nll",
        "setup": "vae_fashion MLP 784-512-16, Bernoulli, untrained (seeded)",
        "inputs": timings["current"][0]["inputs"],
        "k": args.k,
        "batch_size": args.batch_size,
        "chunk_size": max(1, args.rows // args.batch_size),
        "threads": args.threads,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "examples_per_s": examples_per_s,
        "square_2048_matmul_flops_per_s": summary(square_rates),
        "floor_examples_per_s": floor,
        "current_fraction_of_floor": examples_per_s["current"]["cpu"]["best"] / floor,
    }
    if args.baseline:
        result["baseline_file"] = args.baseline
        result["baseline_speedup"] = {
            clock: {
                stat: examples_per_s["baseline"][clock][stat]
                / examples_per_s["current"][clock][stat]
                for stat in ("best", "median")
            }
            for clock in ("wall", "cpu")
        }
    shown = ("examples_per_s", "floor_examples_per_s", "current_fraction_of_floor")
    print(json.dumps({key: result[key] for key in shown + ("baseline_speedup",) if key in result}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
