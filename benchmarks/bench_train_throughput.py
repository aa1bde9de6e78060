"""Lightning training throughput against a bare PyTorch loop of the same model.

Fashion-MNIST, MLP 784-512-16, Bernoulli likelihood on dynamically binarised pixels,
Adam 1e-3, batch 128 (the `vae_fashion` experiment). Both sides use the same
``GaussianVAE.compute_terms``, the same in-memory tensors and the same binarisation
(``vae.data.binarize.sample_binary``: ``u < p``, which is ~3x faster than ``torch.bernoulli``
on CPU), on the same CPU threads:

* bare: a hand-written loop (permute, gather, binarise, forward, backward, step), no logging,
  no checks, no checkpoints;
* lightning: the real ``experiments.train.train`` with the experiment's config, progress bar,
  TensorBoard logging, NaN guards and periodic ``last.ckpt`` as users get them; its figure is
  ``train_samples_per_s`` from metrics.json (training batches only, validation excluded).

  The experiment sets ``train_loop.steps_per_call=8``: each Lightning training step takes 8
  optimizer steps on a pack of 8 batches, so Lightning's per-batch machinery runs once per 8
  steps (the same batches, noise and metrics as one step per call, bit for bit);
* lightning_step_per_batch: the same ``train`` with ``train_loop.steps_per_call=1``, one
  optimizer step per Lightning batch (automatic optimisation), to show what the packing gains;
* lightning_minimal: Lightning's own floor, for reference: a three-method LightningModule
  around the same ``compute_terms`` (automatic optimisation), the same DataLoader, and a
  Trainer with no logger, checkpoints, progress bar or callbacks but the throughput clock.

All run in one process, after the same ``vae.training.runtime.skip_failing_nvml_probe()`` that
``train`` applies, so none pays for another's environment.

Timing on a shared 2-core VM drifts by 10-20% within a minute, so the comparison is built from
short, alternating measurements: ``--rounds`` rounds of one epoch of each variant (each from a
fresh model; the order rotates between rounds). Reported, for each variant against bare:

* ``ratio_of_best``: best epoch / best bare epoch, each the least disturbed of its kind (the
  headline: an intrinsic cost, not a measure of the neighbours);
* ``median_of_round_ratios``: the median over rounds of variant / bare in that round.

A separate ``--epochs``-epoch ``train`` run gives the test ELBO (``test=true eval.k=1``: the
exact KL and a one-sample reconstruction term on the 10k test split, as ``vae-eval`` defines it).

    python benchmarks/bench_train_throughput.py [--rounds 8] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.train import CONFIG_DIR, train  # noqa: E402
from vae.data import FashionMNISTDataModule  # noqa: E402
from vae.data.binarize import sample_binary  # noqa: E402
from vae.models import GaussianVAE  # noqa: E402
from vae.training.callbacks import TrainThroughput  # noqa: E402
from vae.training.runtime import skip_failing_nvml_probe  # noqa: E402

BATCH_SIZE = 128


def bare_epoch(train_images: torch.Tensor, seed: int) -> float:
    """Samples per second of one epoch of a plain PyTorch training loop on in-memory tensors."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[512], latent_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    samples = 0
    start = time.perf_counter()
    order = torch.randperm(train_images.shape[0])
    for step, begin in enumerate(range(0, order.numel(), BATCH_SIZE)):
        x = sample_binary(train_images[order[begin : begin + BATCH_SIZE]], generator)
        loss, _ = model.compute_terms(x, step=step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += x.shape[0]
    return samples / (time.perf_counter() - start)


ONE_STEP_PER_BATCH = ["train_loop.steps_per_call=1"]


def lightning_run(epochs: int, seed: int, test: bool = False, extra: tuple = ()) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        overrides = [
            "experiment=vae_fashion",
            "trainer.accelerator=cpu",
            f"trainer.max_epochs={epochs}",
            f"seed={seed}",
            f"paths.output_dir={workdir}",
            *extra,
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        return train(cfg, test=test)


class MinimalModule(pl.LightningModule):
    """The least a LightningModule needs: the same model, loss and optimiser as the others."""

    def __init__(self) -> None:
        super().__init__()
        self.vae = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[512], latent_dim=16)

    def training_step(self, batch, batch_idx):
        return self.vae.compute_terms(batch[0], step=self.global_step)[0]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def lightning_minimal_epoch(data: FashionMNISTDataModule, seed: int) -> float:
    torch.manual_seed(seed)
    clock = TrainThroughput()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(MinimalModule(), train_dataloaders=data.train_dataloader())
    return clock.samples_per_s


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the ELBO run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip_failing_nvml_probe()

    # Every variant trains on the CPU: no pinned batches, also on a machine with a GPU.
    data = FashionMNISTDataModule(batch_size=BATCH_SIZE, binarize="dynamic", pin_memory=False)
    data.setup()
    train_images = data.train_split.images
    load_before = os.getloadavg()

    variants = {
        "bare": lambda seed: bare_epoch(train_images, seed),
        "lightning": lambda seed: lightning_run(1, seed)["train_samples_per_s"],
        "lightning_step_per_batch": lambda seed: lightning_run(1, seed, extra=ONE_STEP_PER_BATCH)[
            "train_samples_per_s"
        ],
        "lightning_minimal": lambda seed: lightning_minimal_epoch(data, seed),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            rates[name].append(variants[name](round_))
        print(
            f"round {round_}: " + ", ".join(f"{n} {rates[n][-1]:.0f}/s" for n in names), flush=True
        )

    def against_bare(name: str) -> dict:
        return {
            "ratio_of_best": max(rates[name]) / max(rates["bare"]),
            "median_of_round_ratios": statistics.median(
                [v / b for v, b in zip(rates[name], rates["bare"], strict=True)]
            ),
        }

    elbo_run = lightning_run(args.epochs, seed=0, test=True, extra=("eval.k=1",))
    result = {
        "benchmark": "train_throughput",
        "setup": "Fashion-MNIST, MLP 784-512-16, Bernoulli, dynamic binarisation (u < p), "
        "Adam 1e-3, batch 128",
        "rounds": args.rounds,
        "threads": args.threads,
        "cpu": cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "samples_per_s": {
            name: {"best": max(v), "median": statistics.median(v), "all": v}
            for name, v in rates.items()
        },
        "ms_per_step_best": {name: 1e3 * BATCH_SIZE / max(v) for name, v in rates.items()},
        "lightning_vs_bare": against_bare("lightning"),
        "lightning_step_per_batch_vs_bare": against_bare("lightning_step_per_batch"),
        "lightning_minimal_vs_bare": against_bare("lightning_minimal"),
        "target_ratio": 0.9,
        "elbo_run": {
            "epochs": args.epochs,
            "train_samples_per_s": elbo_run["train_samples_per_s"],
            "test_elbo": elbo_run["test/elbo"],
            "val_elbo": elbo_run["val/elbo"],
            "test_bits_per_dim": elbo_run["test/bits_per_dim"],
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shown = (
        "ms_per_step_best",
        "lightning_vs_bare",
        "lightning_step_per_batch_vs_bare",
        "lightning_minimal_vs_bare",
        "elbo_run",
    )
    print(json.dumps({k: result[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
