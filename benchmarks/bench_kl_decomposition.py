"""What the KL decomposition adds to a `vae_fashion` epoch (issue 17: at most 10%).

Each validation epoch of a Gaussian VAE computes ``val/mutual_info``, ``val/total_correlation``
and ``val/dimwise_kl`` from the whole validation split's posteriors
(``vae.eval.KLDecompositionMetric``: 1,000 draws against the 5,000 validation examples of
Fashion-MNIST, 16 latent dimensions). Measured here:

* ``decomposition_s``: the metric's ``update`` over the split in batches of 128 and its
  ``compute()``, on posteriors of the real size (median of ``--rounds``);
* ``epoch_s``: one whole ``vae_fashion`` epoch as users run it, training and validation, the
  wall time of ``vae-train experiment=vae_fashion trainer.max_epochs=2`` less that of
  ``max_epochs=1`` (start-up cancels; median of ``--rounds`` pairs).

Writes ``benchmarks/results/kl_decomposition.json``; ``fraction`` = decomposition_s / epoch_s.

    python benchmarks/bench_kl_decomposition.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VAE_TRAIN = str(Path(sys.executable).parent / "vae-train")
RUN = [
    "experiment=vae_fashion",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
]


def time_decomposition(threads: int, rounds: int) -> list[float]:
    import torch

    from vae.eval import KLDecompositionMetric

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(5000, 16, generator=generator)
    logvar = -2.0 + 0.5 * torch.randn(5000, 16, generator=generator)
    times = []
    for _ in range(rounds):
        metric = KLDecompositionMetric(16)
        start = time.perf_counter()
        for first in range(0, 5000, 128):
            metric.update(mu[first : first + 128], logvar[first : first + 128])
        metric.compute()
        times.append(time.perf_counter() - start)
    return times


def time_training(epochs: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run(
            [VAE_TRAIN, *RUN, f"trainer.max_epochs={epochs}", f"threads={threads}"],
            cwd=workdir,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    decomposition = time_decomposition(args.threads, args.rounds)
    epochs = []
    for _ in range(args.rounds):
        one, two = time_training(1, args.threads), time_training(2, args.threads)
        epochs.append(two - one)
    result = {
        "threads": args.threads,
        "decomposition_s": decomposition,
        "epoch_s": epochs,
        "median_decomposition_s": statistics.median(decomposition),
        "median_epoch_s": statistics.median(epochs),
        "fraction": statistics.median(decomposition) / statistics.median(epochs),
        "load_average": os.getloadavg(),
    }
    out = ROOT / "benchmarks" / "results" / "kl_decomposition.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
