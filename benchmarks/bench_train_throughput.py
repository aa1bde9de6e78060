"""Lightning training throughput against a bare PyTorch loop of the same model.

Fashion-MNIST, MLP 784-512-16, Bernoulli likelihood on dynamically binarised pixels,
Adam 1e-3, batch 128 (the `vae_fashion` experiment). Both sides use the same
``GaussianVAE.compute_terms`` and the same in-memory tensors, on the same CPU threads:

* bare: a hand-written loop (permute, gather, binarise, forward, backward, step);
* lightning: the real ``experiments.train.train`` with the experiment's config, progress bar
  and logging as users get them; its figure is ``train_samples_per_s`` from metrics.json
  (training batches only, validation excluded).

The two alternate ``--repeats`` times; the headline ratio is the median of the per-repeat
ratios (each pair ran back to back, so slow phases of a shared machine hit both alike). The Lightning run also
reports the test ELBO after its epochs (single-sample ELBO on the 10k test split).

    python benchmarks/bench_train_throughput.py [--epochs 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.train import CONFIG_DIR, train  # noqa: E402
from vae.data import FashionMNISTDataModule  # noqa: E402
from vae.models import GaussianVAE  # noqa: E402


def bare_loop(train_images: torch.Tensor, epochs: int, batch_size: int, seed: int) -> float:
    """Samples per second of a plain PyTorch training loop on in-memory tensors."""
    torch.manual_seed(seed)
    model = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[512], latent_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    samples, seconds, step = 0, 0.0, 0
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(train_images.shape[0])
        for begin in range(0, order.numel(), batch_size):
            x = torch.bernoulli(train_images[order[begin : begin + batch_size]])
            loss, _ = model.compute_terms(x, step=step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += x.shape[0]
            step += 1
        seconds += time.perf_counter() - start
    return samples / seconds


def lightning_run(epochs: int, seed: int, workdir: Path) -> dict:
    overrides = [
        "experiment=vae_fashion",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={epochs}",
        f"seed={seed}",
        f"paths.output_dir={workdir}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return train(cfg, test=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = FashionMNISTDataModule(batch_size=128, binarize="dynamic")
    data.setup()
    train_images = data.train_split.images

    bare, lightning, runs = [], [], []
    for repeat in range(args.repeats):
        bare.append(bare_loop(train_images, args.epochs, 128, seed=repeat))
        with tempfile.TemporaryDirectory() as tmp:
            metrics = lightning_run(args.epochs, seed=repeat, workdir=Path(tmp))
        lightning.append(metrics["train_samples_per_s"])
        runs.append(metrics)
        print(
            f"repeat {repeat}: bare {bare[-1]:.0f}/s, lightning {lightning[-1]:.0f}/s", flush=True
        )

    result = {
        "benchmark": "train_throughput",
        "setup": "Fashion-MNIST, MLP 784-512-16, Bernoulli, dynamic binarisation, Adam 1e-3, batch 128",
        "epochs": args.epochs,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "bare_samples_per_s": statistics.median(bare),
        "lightning_samples_per_s": statistics.median(lightning),
        "ratio": statistics.median([lit / b for lit, b in zip(lightning, bare, strict=True)]),
        "ratio_of_medians": statistics.median(lightning) / statistics.median(bare),
        "bare_all": bare,
        "lightning_all": lightning,
        "test_elbo": [m["test/elbo"] for m in runs],
        "val_elbo": [m["val/elbo"] for m in runs],
        "test_bits_per_dim": [m["test/bits_per_dim"] for m in runs],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
