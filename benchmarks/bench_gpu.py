"""Issue 19's GPU benchmarks in one prepared script: training throughput, the quantizer against
its floor, and IW-NLL at k = 5000 against a per-example loop, written to one JSON.

Sections (each time-boxed, each failure recorded and the next section run; the JSON is
rewritten after every measurement, so a run killed at its limit still leaves its numbers):

* ``quantizer``: bench_quantizer's shapes (N = 65,536 vectors, K = 1,024 codes, D = 64) on the
  device: the floor (one ``addmm`` of ||e||^2 - 2 z.e and ``argmin``), the same search chunked
  (``nearest_codes``), and ``VectorQuantizer(ema=True)``'s training forward; the device is
  synchronised inside each timed call. Rate = vectors per second.
* ``iw_nll``: the ``vae_fashion`` model (MLP 784-512-16, Bernoulli, untrained but seeded: speed
  does not depend on the weights) on binarised Fashion-MNIST test images, k = 5000.
  ``vae.eval.importance_weighted_nll`` (all examples of a batch decoded together) against
  ``pythae_style_nll``, pythae's ``get_nll`` loop (one example at a time, 100 samples per call,
  the encoder re-run on 100 copies each call, a host sync per example). Both must give the
  same number from the same draws: seeded alike, one example at a time, they differ only by
  float32 rounding; the largest difference over a few examples is recorded and must be below
  1e-3 nats. Rate = examples per second.
* ``train_mlp`` and ``train_conv``: Fashion-MNIST (55,000 training images, batch 128,
  dynamic binarisation, Adam 1e-3), (a) the ``vae_fashion`` MLP VAE and (b) the conv VAE
  (``model.arch=conv model.hidden_dims=[32,64]``, latent 16). Variants:

  - ``bare``: plain torch, none of our model code (``bench_train_throughput.PlainVAE``, or
    ``PlainConvVAE`` here): the training images resident on the device, a device ``randperm``
    per pass, a gather, dynamic binarisation and one Adam step per batch, no logging. Timed
    over ``--steps`` steps after ``--steps // 10`` untimed ones.
  - ``vae-train`` through ``experiments.train.train(cfg)`` (``bench_train_throughput.
    lightning_run``: ``experiment=vae_fashion``, a temporary run directory) for two epochs of
    ``--steps`` batches each; its speed is ``train_samples_per_s`` from ``WarmedThroughput``,
    vae-train's ``TrainThroughput`` clock restarted after the first epoch, so that
    ``torch.compile``'s graph capture, cuDNN's algorithm search and the allocator's growth are
    left out. Variants: ``fp32`` (the config as users get it), ``bf16``
    (``trainer.precision=bf16-mixed``), ``compile`` (``model.compile=true``),
    ``channels_last`` (conv only, ``model.channels_last=true``), ``data_on_device``
    (``data.on_device=true``: the splits kept in device memory), ``data_on_host``
    (``data.on_device=false``: batches copied from host memory each step), and ``fastest``
    (all the speed switches together). A variant whose config key is not in ``conf/`` is
    skipped with a note; one that fails is recorded and dropped from later rounds.

  One round runs every variant once (a fresh model each), the order rotating between rounds.
  Up to ``--rounds`` rounds; after the first, a variant runs again only while the section's
  time so far plus that variant's last duration stays within ``--budget-s`` (so a slow
  compile variant may get fewer rounds than the others). Reported per variant: samples per
  second (median and best over its rounds), ratio to bare (best / best, and the median over
  the rounds both ran of variant / bare), the speed-up over ``fp32`` (best / best), and peak
  device memory.

Peak memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` before each
measurement (the high-water mark of tensors, not of the caching allocator's reserve); null on a
CPU. ``--budget-s`` is also a hard limit: a section still running at 1.3 x budget is stopped
(SIGALRM) and recorded as timed out.

    python benchmarks/bench_gpu.py [--device cuda] [--budget-s 150] [--rounds 3] [--steps 200]
                                   [--sections quantizer iw_nll train_mlp train_conv]
    python benchmarks/bench_gpu.py --device cpu --quick --out /tmp/gpu_smoke.json  # smoke run

On the lent H200 (its python3 has torch and Lightning, but neither Hydra nor OmegaConf, and no
dataset; nothing can be fetched there), prepare once here, in the repository root (``data/`` is
git-ignored and travels when carried):

    mkdir -p data/FashionMNIST/raw data/site
    cp /usr/share/datasets/fashion-mnist/*.gz data/FashionMNIST/raw/
    cp -r .venv/lib/python3.*/site-packages/{hydra,omegaconf,antlr4} data/site/

then run, carrying ``data`` (about 34 MB), with a limit of about 540 s (typically ~5.5 min):

    PYTHONPATH=data/site PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vae.training.callbacks import TrainThroughput  # noqa: E402

SECTIONS = ("quantizer", "iw_nll", "train_mlp", "train_conv")
BATCH_SIZE = 128
LATENT = 16
AGREEMENT_TOLERANCE_NATS = 1e-3
PYTHAE_SAMPLES_PER_CALL = 100  # pythae's get_nll default batch_size
HARD_LIMIT_FACTOR = 1.3


class SectionTimeout(BaseException):
    """Raised by the alarm when a section runs past its hard limit. A BaseException, like
    KeyboardInterrupt, so that the ``except Exception`` of a library (a compiler falling back,
    a variant's own error record) does not swallow it."""


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise ``SectionTimeout`` in the main thread after ``seconds`` (SIGALRM), and again every
    second after that until the block is left, in case a library swallows the first."""

    def on_alarm(signum, frame):
        HARD_LIMIT_PASSED[0] = True
        raise SectionTimeout(f"stopped at the hard limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    HARD_LIMIT_PASSED[0] = False
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Whether the alarm of the current hard_limit has fired: an error that a library raised while
# unwinding from it (Lightning's teardown, say) is the limit's doing, not the variant's.
HARD_LIMIT_PASSED = [False]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """``torch.cuda.max_memory_allocated`` over a block, in MiB (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20


def rates_summary(rates: list[float]) -> dict:
    return {
        "samples_per_s_median": statistics.median(rates),
        "samples_per_s_best": max(rates),
        "samples_per_s_all": rates,
    }


# --- the bare side: plain torch -----------------------------------------------------------------
class PlainConvVAE(nn.Module):
    """The conv VAE of ``model.arch=conv model.hidden_dims=[32,64] model.latent_dim=16`` in plain
    torch: the layers of ``vae.nn.ConvEncoder``/``ConvDecoder`` with ``GaussianEncoder``'s heads.

    Encoder: Conv2d(1, 32, 3, stride 2, pad 1) -> ReLU -> Conv2d(32, 64, ...) -> ReLU (28 -> 14
    -> 7) -> flatten (3136) -> two heads Linear(3136, 16) for mu and logvar. Decoder:
    Linear(16, 3136) -> (64, 7, 7) -> ReLU -> ConvTranspose2d(64, 32, 3, 2, 1, output_padding 1)
    -> ReLU -> ConvTranspose2d(32, 1, ...) (7 -> 14 -> 28), Bernoulli logits. Loss as
    ``bench_train_throughput.PlainVAE``: summed BCE + closed-form KL, nats per example.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.mu_head = nn.Linear(64 * 7 * 7, LATENT)
        self.logvar_head = nn.Linear(64 * 7 * 7, LATENT)
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, 64 * 7 * 7),
            nn.Unflatten(1, (64, 7, 7)),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 3, stride=2, padding=1, output_padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The negative ELBO, nats per example averaged over the batch (one sample of z)."""
        features = self.body(x)
        mu, logvar = self.mu_head(features), self.logvar_head(features)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)
        return recon.flatten(1).sum(1).mean() + kl.sum(1).mean()


def bare_rate(model: nn.Module, images: torch.Tensor, steps: int, seed: int) -> float:
    """Samples per second of a plain loop on device-resident ``images``: ``steps // 10``
    untimed steps, then ``steps`` timed ones, the device synchronised at both ends."""
    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    order = torch.randperm(images.shape[0], device=device, generator=generator)
    position = 0

    def step() -> None:
        nonlocal order, position
        if position + BATCH_SIZE > order.numel():
            order = torch.randperm(images.shape[0], device=device, generator=generator)
            position = 0
        x = images[order[position : position + BATCH_SIZE]]
        position += BATCH_SIZE
        x = (torch.rand(x.shape, device=device, generator=generator) < x).float()
        loss = model(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(max(1, steps // 10)):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * BATCH_SIZE / (time.perf_counter() - start)


# --- vae-train ----------------------------------------------------------------------------------
class WarmedThroughput(TrainThroughput):
    """vae-train's ``TrainThroughput`` clock, restarted after the first ``warmup_epochs`` epochs
    (compilation, algorithm search and allocator growth happen there), with the device
    synchronised wherever the clock starts or stops, so queued kernels count where they ran."""

    def __init__(self, warmup_epochs: int = 1) -> None:
        super().__init__()
        self.warmup_epochs = warmup_epochs
        self.epochs_done = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        super().on_train_epoch_start(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        super().on_validation_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        super().on_train_epoch_end(trainer, pl_module)
        self.epochs_done += 1
        if self.epochs_done <= self.warmup_epochs:
            self.samples, self.seconds = 0, 0.0


ARCH_OVERRIDES = {
    "mlp": (),  # vae_fashion's own: MLP 784-512-16
    "conv": ("model.arch=conv", "model.hidden_dims=[32,64]"),
}


def train_variants(arch: str) -> dict[str, tuple[str, ...]]:
    """vae-train's variants: name -> the overrides added to the common ones."""
    variants = {
        "fp32": (),
        "bf16": ("trainer.precision=bf16-mixed",),
        "compile": ("model.compile=true",),
    }
    fastest = ["trainer.precision=bf16-mixed", "model.compile=true", "data.on_device=true"]
    if arch == "conv":
        variants["channels_last"] = ("model.channels_last=true",)
        fastest.append("model.channels_last=true")
    variants["data_on_device"] = ("data.on_device=true",)
    variants["data_on_host"] = ("data.on_device=false",)
    variants["fastest"] = tuple(fastest)
    return variants


def common_overrides(device: torch.device, steps: int, val_batches: int) -> tuple[str, ...]:
    target = f"{WarmedThroughput.__module__}.{WarmedThroughput.__qualname__}"
    return (
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"trainer.limit_train_batches={steps}",
        f"trainer.limit_val_batches={val_batches}",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        f"callbacks.throughput._target_={target}",
    )


def missing_keys(overrides: tuple[str, ...]) -> list[str]:
    """The keys of ``overrides`` that the composed ``vae_fashion`` config does not have."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=vae_fashion"])
    absent = object()
    keys = [o.split("=", 1)[0] for o in overrides if not o.startswith("+")]
    return [k for k in keys if OmegaConf.select(cfg, k, default=absent) is absent]


def vae_train_runs(arch: str, common: tuple[str, ...], record: dict) -> dict:
    """name -> run(seed) -> samples/s for each vae-train variant whose config keys exist;
    the others go to ``record["skipped"]`` with the reason, and the overrides of each to
    ``record["commands"]``."""
    import torch._dynamo.utils
    from bench_train_throughput import lightning_run

    record.setdefault("skipped", {})
    record.setdefault("commands", {})
    runs = {}
    for name, overrides in train_variants(arch).items():
        absent = missing_keys(overrides)
        if absent:
            record["skipped"][name] = (
                f"config key {', '.join(absent)} is not in conf/ at this commit"
            )
            continue

        def run(seed: int, name=name, overrides=overrides) -> float:
            # Dynamo's caches are per code object, shared by every model of a process: without
            # a reset, the runs before would use up its recompile limit (8) and a later compile
            # variant would silently run eager. Each run compiles afresh (Inductor's on-disk
            # cache still helps), and the graphs it compiled are recorded.
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            metrics = lightning_run(2, seed, extra=(*common, *overrides))
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            record.setdefault("compiled_graphs_last_run", {})[name] = graphs
            return metrics["train_samples_per_s"]

        runs[name] = run
        record["commands"][name] = " ".join(overrides) or "(the experiment's defaults)"
    return runs


def train_section(arch: str, args, device: torch.device, record: dict, save) -> None:
    """Rounds of bare vs vae-train variants on one model; fills ``record`` as it goes."""
    from bench_train_throughput import PlainVAE

    from vae.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(batch_size=BATCH_SIZE, binarize="dynamic", pin_memory=False)
    data.setup()
    images = data.train_split.images.to(device)
    common = (*ARCH_OVERRIDES[arch], *common_overrides(device, args.steps, args.val_batches))
    record["setup"] = (
        f"Fashion-MNIST ({images.shape[0]:,} training images), "
        + ("MLP 784-512-16" if arch == "mlp" else "conv [32,64] latent 16")
        + f", Bernoulli, dynamic binarisation, Adam 1e-3, batch {BATCH_SIZE}; bare: "
        f"{args.steps} timed steps after {max(1, args.steps // 10)}; vae-train: 2 epochs of "
        f"{args.steps} steps, the first excluded"
    )
    record["common_overrides"] = ["experiment=vae_fashion", "trainer.max_epochs=2", *common]
    record["failed"] = {}
    plain = {"mlp": PlainVAE, "conv": PlainConvVAE}[arch]

    def bare(seed: int) -> float:
        torch.manual_seed(seed)
        return bare_rate(plain().to(device), images, args.steps, seed)

    variants = {"bare": bare, **vae_train_runs(arch, common, record)}
    commands = {"bare": f"plain torch ({plain.__name__}), device-resident tensors"}
    commands.update(record["commands"])

    # rates[name][round] and peaks[name][round]: a variant can miss a round (budget, failure).
    rates: dict[str, dict[int, float]] = {name: {} for name in variants}
    peaks: dict[str, dict[int, float]] = {name: {} for name in variants}
    durations: dict[str, float] = {}
    started = time.perf_counter()
    names = list(variants)
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = time.perf_counter() - started
            if name in record["failed"] or (
                round_ > 0 and elapsed + durations.get(name, 0.0) > args.budget_s
            ):
                continue
            began = time.perf_counter()
            try:
                with PeakMemory(device) as memory:
                    rate = variants[name](round_)
            except Exception as error:  # recorded; the other variants go on
                if HARD_LIMIT_PASSED[0]:
                    raise SectionTimeout(f"hard limit passed; then {error!r}") from error
                record["failed"][name] = f"{type(error).__name__}: {error}"[:2000]
                print(f"  {arch} {name}: FAILED {record['failed'][name][:300]}", flush=True)
                continue
            durations[name] = time.perf_counter() - began
            rates[name][round_] = rate
            if memory.peak_mib is not None:
                peaks[name][round_] = memory.peak_mib
            print(
                f"  {arch} round {round_} {name}: {rate:,.0f} samples/s ({durations[name]:.1f} s)",
                flush=True,
            )
            record["rows"] = summarise_training(rates, peaks, commands)
            record["run_seconds_last"] = durations
            save()
    record["rounds_done"] = {name: len(values) for name, values in rates.items()}
    if min(record["rounds_done"].values(), default=0) < args.rounds:
        record["budget_note"] = (
            f"a variant runs again only while the section's time so far plus its last run's "
            f"duration stays within --budget-s {args.budget_s:.0f}"
        )


def summarise_training(rates: dict, peaks: dict, commands: dict) -> dict:
    """Per variant: rates over rounds, ratios to bare (best / best; median over the rounds both
    ran of variant / bare), speed-up over fp32 (best / best) and the highest peak memory."""
    rows = {}
    bare = rates.get("bare") or {}
    fp32 = rates.get("fp32") or {}
    for name, by_round in rates.items():
        if not by_round:
            continue
        values = list(by_round.values())
        row = {"command": commands[name], **rates_summary(values), "rounds": len(values)}
        row["peak_memory_mib"] = max(peaks[name].values()) if peaks[name] else None
        if name != "bare" and bare:
            row["ratio_to_bare_of_best"] = max(values) / max(bare.values())
            paired = [v / bare[r] for r, v in by_round.items() if r in bare]
            row["ratio_to_bare_median_of_rounds"] = statistics.median(paired) if paired else None
        if name not in ("bare", "fp32") and fp32:
            row["speedup_over_fp32_of_best"] = max(values) / max(fp32.values())
        rows[name] = row
    return rows


# --- the quantizer ------------------------------------------------------------------------------
def quantizer_section(args, device: torch.device, record: dict, save) -> None:
    from bench_quantizer import (
        CODE_DIM,
        NUM_CODES,
        bare_search,
        latents,
        make_quantizer,
        time_variants,
    )

    from vae.nn.quantizer import nearest_codes

    num_vectors = args.quantizer_vectors
    z = latents(num_vectors).to(device).requires_grad_(True)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, CODE_DIM).contiguous()
    quantizer = make_quantizer().to(device)
    codebook = quantizer.codebook.detach().clone()
    calls = {
        "floor_addmm_argmin": lambda: bare_search(flat, codebook),
        "chunked_addmm_argmin": lambda: nearest_codes(flat, codebook),
        "vector_quantizer_train_forward": lambda: quantizer(z),
    }
    record["setup"] = (
        f"N={num_vectors:,} vectors (z of shape {tuple(z.shape)}, requires grad), K={NUM_CODES}, "
        f"D={CODE_DIM}, float32; VectorQuantizer(ema=True, dead_code_threshold=1) in training "
        "mode (bench_quantizer.make_quantizer); the device synchronised inside each timed call"
    )

    def synchronised(fn):
        def call():
            out = fn()
            synchronize(device)
            return out

        return call

    peaks = {}
    for name, fn in calls.items():
        with PeakMemory(device) as memory:
            out = fn()
        del out
        peaks[name] = memory.peak_mib
    times = time_variants({n: synchronised(fn) for n, fn in calls.items()}, args.repeats)
    floor = times["floor_addmm_argmin"]
    rows = {}
    for name, seconds in times.items():
        rows[name] = {
            "command": name,
            **rates_summary([num_vectors / s for s in seconds]),
            "seconds_median": statistics.median(seconds),
            "seconds_min": min(seconds),
            "time_ratio_to_floor_median": statistics.median(seconds) / statistics.median(floor),
            "time_ratio_to_floor_min": min(seconds) / min(floor),
            "peak_memory_mib": peaks[name],
        }
    record["rows"] = rows
    save()


# --- IW-NLL -------------------------------------------------------------------------------------
@torch.no_grad()
def pythae_style_nll(
    model, x: torch.Tensor, k: int, samples_per_call: int = PYTHAE_SAMPLES_PER_CALL, seeds=None
) -> torch.Tensor:
    """-log (1/k) sum_i p(x, z_i) / q(z_i|x) per example, nats, (B,), computed as pythae's
    ``VAE.get_nll`` does (``src/pythae/models/vae/vae_model.py``): one example at a time; for
    each call of ``samples_per_call`` draws, the example is copied that many times and
    re-encoded, z = mu + std * eps, and

        log w = log p(x|z) + log N(z; 0, I) - log q(z|x),

    with log q(z|x) = -1/2 sum_d [logvar_d + (z_d - mu_d)^2 / exp(logvar_d)] and
    log N(z; 0, I) = -1/2 sum_d z_d^2 (the log 2 pi terms cancel); then logsumexp - log k in
    float32 and ``.item()`` (a host sync) per example. Our model's encoder, decoder and
    likelihood stand in for pythae's.

    ``seeds``: one seed per example for the draws (a generator on ``x``'s device), so that
    ``importance_weighted_nll`` on that example alone, with ``chunk_size=samples_per_call`` and
    a generator seeded alike, uses the very same eps; None draws from the global stream.
    """
    values = []
    for index in range(x.shape[0]):
        generator = None
        if seeds is not None:
            generator = torch.Generator(device=x.device).manual_seed(int(seeds[index]))
        example = x[index : index + 1]
        log_w = []
        for start in range(0, k, samples_per_call):
            copies = torch.cat(min(samples_per_call, k - start) * [example])
            mu, logvar = model.encode(copies)
            eps = torch.randn(mu.shape, generator=generator, device=x.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
            log_q = -0.5 * (logvar + (z - mu) ** 2 / torch.exp(logvar)).sum(-1)
            log_prior = -0.5 * (z**2).sum(-1)
            log_likelihood = -model.reconstruction_nll(model.decode(z), copies)
            log_w.append(log_likelihood + log_prior - log_q)
        values.append(-(torch.logsumexp(torch.cat(log_w), 0) - math.log(k)).item())
    return torch.tensor(values)


def iw_nll_section(args, device: torch.device, record: dict, save) -> None:
    from bench_iw_nll import HIDDEN, inputs
    from bench_iw_nll import LATENT as IW_LATENT

    from vae.eval.nll import default_chunk_size, importance_weighted_nll
    from vae.models import GaussianVAE

    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 28, 28), hidden_dims=[HIDDEN], latent_dim=IW_LATENT)
    model = model.eval().to(device)
    k = args.k
    x, source = inputs(args.iw_batch)
    x = x.to(device)
    record["setup"] = (
        f"vae_fashion MLP 784-{HIDDEN}-{IW_LATENT}, Bernoulli, untrained (seeded); {source}; "
        f"k={k}; ours on {args.iw_batch} examples at once (chunk_size "
        f"{default_chunk_size(args.iw_batch, k, device)}), the pythae-style loop on the first "
        f"{args.pythae_examples} one by one ({PYTHAE_SAMPLES_PER_CALL} samples per call)"
    )

    # Agreement: the same draws through both, one example at a time.
    seeds = list(range(args.agreement_examples))
    theirs = pythae_style_nll(model, x[: len(seeds)], k, seeds=seeds)
    ours = torch.stack(
        [
            importance_weighted_nll(
                model,
                x[i : i + 1],
                k,
                chunk_size=PYTHAE_SAMPLES_PER_CALL,
                generator=torch.Generator(device=device).manual_seed(seed),
            )[0].cpu()
            for i, seed in enumerate(seeds)
        ]
    )
    difference = (ours.double() - theirs.double()).abs().max().item()
    record["agreement"] = {
        "examples": len(seeds),
        "nll_ours": ours.tolist(),
        "nll_pythae_style": theirs.tolist(),
        "max_abs_difference_nats": difference,
        "tolerance_nats": AGREEMENT_TOLERANCE_NATS,
        "agree": difference < AGREEMENT_TOLERANCE_NATS,
    }
    save()

    few = x[: args.pythae_examples]
    calls = {
        "ours": (args.iw_batch, lambda: importance_weighted_nll(model, x, k)),
        "pythae_style_loop": (args.pythae_examples, lambda: pythae_style_nll(model, few, k)),
    }
    importance_weighted_nll(model, x, min(k, 100))  # warm-up (kernels, allocator)
    pythae_style_nll(model, x[:1], min(k, 2 * PYTHAE_SAMPLES_PER_CALL))
    rates: dict[str, list[float]] = {name: [] for name in calls}
    peaks: dict[str, float | None] = {}
    for _ in range(args.repeats):
        for name, (examples, fn) in calls.items():
            with PeakMemory(device) as memory:
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                rates[name].append(examples / (time.perf_counter() - start))
            if memory.peak_mib is not None:
                peaks[name] = max(peaks.get(name) or 0.0, memory.peak_mib)
        rows = {}
        for name, values in rates.items():
            rows[name] = {
                "command": name,
                **rates_summary(values),
                "peak_memory_mib": peaks.get(name),
            }
        rows["ours"]["speedup_over_pythae_style_of_best"] = max(rates["ours"]) / max(
            rates["pythae_style_loop"]
        )
        rows["ours"]["speedup_over_pythae_style_median"] = statistics.median(
            rates["ours"]
        ) / statistics.median(rates["pythae_style_loop"])
        record["rows"] = rows
        save()
    if difference >= AGREEMENT_TOLERANCE_NATS:
        raise AssertionError(
            f"ours and the pythae-style loop differ by {difference:.2e} nats on the same draws "
            f"(tolerance {AGREEMENT_TOLERANCE_NATS})"
        )


# --- the run ------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["device_memory_gib"] = props.total_memory / 2**30
        info["cuda"] = torch.version.cuda
    try:
        import lightning

        info["lightning"] = lightning.__version__
        from bench_train_throughput import cpu_model, git

        info["cpu"] = cpu_model()
        info["commit"] = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--", "vae", "experiments", "conf", "benchmarks")
        info["uncommitted_changes"] = (changes or "").splitlines()
    except Exception as error:  # e.g. hydra missing: the sections say more
        info["machine_info_error"] = f"{type(error).__name__}: {error}"
    info.setdefault("device", info.get("cpu", platform.processor() or platform.machine()))
    info["cpus_usable"] = len(os.sched_getaffinity(0))
    info["threads"] = torch.get_num_threads()
    return info


def print_table(result: dict) -> None:
    header = f"{'section':<11} {'variant':<31} {'median/s':>10} {'best/s':>10} {'x bare':>7}"
    header += f" {'speedup':>7} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))

    def number(value, spec):
        return format(value, spec) if isinstance(value, int | float) else "-"

    for section, record in result["sections"].items():
        for name, row in (record.get("rows") or {}).items():
            ratio = row.get("ratio_to_bare_of_best", row.get("time_ratio_to_floor_min"))
            speedup = row.get(
                "speedup_over_fp32_of_best", row.get("speedup_over_pythae_style_of_best")
            )
            print(
                f"{section:<11} {name:<31} {number(row['samples_per_s_median'], ',.0f'):>10} "
                f"{number(row['samples_per_s_best'], ',.0f'):>10} {number(ratio, '.2f'):>7} "
                f"{number(speedup, '.2f'):>7} {number(row.get('peak_memory_mib'), ',.0f'):>9}"
            )
        for name, why in {**record.get("skipped", {}), **record.get("failed", {})}.items():
            print(f"{section:<11} {name:<31} {why[:80]}")
        if record.get("status") != "ok":
            print(f"{section:<11} {record.get('status')}: {str(record.get('error'))[:100]}")
        if "agreement" in record:
            agreement = record["agreement"]
            print(
                f"{section:<11} agreement over {agreement['examples']} examples: max |ours - "
                f"pythae-style| = {agreement['max_abs_difference_nats']:.2e} nats"
            )
    print(
        "x bare: best / best bare (quantizer: time / floor time); speedup: best / best of "
        "vae-train fp32 (iw_nll: ours over the pythae-style loop)"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run on a CPU")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--budget-s", type=float, default=None, help="per section (150; quick 60)")
    parser.add_argument("--rounds", type=int, default=None, help="training rounds (3; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (200; quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (20; quick 2)")
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "budget_s": 60.0 if quick else 150.0,
        "rounds": 2 if quick else 3,
        "steps": 4 if quick else 200,
        "repeats": 2 if quick else 20,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.val_batches = 1 if quick else 2
    args.quantizer_vectors = 16_384 if quick else 65_536
    args.iw_batch = 8 if quick else 512
    args.pythae_examples = 2 if quick else 32
    args.agreement_examples = 2 if quick else 4
    if args.device == "cuda":
        args.repeats = max(args.repeats, 3)
    return args


def quiet_libraries() -> None:
    """Lightning's per-Trainer banner (accelerator, AMP, limit_* notes) would bury the table in a
    run's output; its warnings and errors still show."""
    from vae.training.library_noise import silence_library_noise

    silence_library_noise()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The number of training batches")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench_gpu: --device cuda, but torch.cuda.is_available() is False here: run it "
            "where a GPU is lent, or pass --device cpu --quick for a smoke run"
        )
    quiet_libraries()
    device = torch.device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "gpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "budget_s_per_section": args.budget_s,
        "hard_limit_s_per_section": HARD_LIMIT_FACTOR * args.budget_s,
        **machine(device),
        "sections": {},
    }

    def save() -> None:
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_text(json.dumps(result, indent=2) + "\n")
        temporary.replace(out)

    functions = {
        "quantizer": quantizer_section,
        "iw_nll": iw_nll_section,
        "train_mlp": lambda *a: train_section("mlp", *a),
        "train_conv": lambda *a: train_section("conv", *a),
    }
    for section in args.sections:
        record = result["sections"][section] = {"status": "running"}
        save()
        print(f"== {section}", flush=True)
        began = time.perf_counter()
        try:
            with hard_limit(HARD_LIMIT_FACTOR * args.budget_s):
                functions[section](args, device, record, save)
            record["status"] = "ok"
        except SectionTimeout as error:
            signal.setitimer(signal.ITIMER_REAL, 0)  # should one have escaped hard_limit's exit
            record.update(status="timed out", error=str(error))
        except Exception as error:
            record.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
            record["traceback"] = traceback.format_exc()[-4000:]
            print(record["traceback"], file=sys.stderr, flush=True)
        record["seconds"] = time.perf_counter() - began
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    print_table(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
