"""DDP on CPU processes (gloo): what must agree across processes, and what 2 processes must give
exactly as 1 does. The quantizer's own statistics test is
``tests/test_quantizer.py::test_two_gloo_processes_keep_identical_codebooks_and_sum_statistics``;
one DDP run of the CLI is ``tests/test_reliability.py::test_ddp_on_two_cpu_processes_writes_one_run``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.cli import QUICK, REPO, read_metrics, run_cli
from vae.nn import VectorQuantizer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

STEPS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TinyVQVAE(nn.Module):
    """Conv encoder, EMA quantizer with dead-code restarts, conv decoder: the parts of a VQ-VAE
    whose state DDP and the quantizer's collectives must keep equal on every process."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, 2, 3, padding=1)
        # Far-away initial codes die after 2 steps and are re-seeded from a process's batch.
        self.quantizer = VectorQuantizer(8, 2, ema=True, decay=0.9, dead_code_threshold=2)
        self.decoder = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quantizer(self.encoder(x))
        recon = self.decoder(out.quantized)
        return ((recon - x) ** 2).sum(dim=(1, 2, 3)).mean() + out.loss.mean()


def _train_tiny_vqvae(rank: int, synchronised: bool) -> dict[str, torch.Tensor]:
    """``STEPS`` Adam steps of a DDP-wrapped ``TinyVQVAE`` (as Lightning wraps it: buffers
    broadcast from process 0 before each forward) on this process's own data; its state."""
    import vae.nn.quantizer as quantizer_module

    saved = quantizer_module.all_reduce_sum, quantizer_module.broadcast_from_first
    if not synchronised:  # each process keeps its own statistics and restart draws
        quantizer_module.all_reduce_sum = quantizer_module.broadcast_from_first = lambda t: t
    try:
        torch.manual_seed(0)  # the same initial model on every process
        model = TinyVQVAE()
        model.quantizer._set_codes(torch.arange(8), torch.full((8, 2), 50.0))
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        torch.manual_seed(100 + rank)  # different data (and restart draws) per process
        for _ in range(STEPS):
            x = torch.randn(4, 1, 6, 6) + 3.0 * rank
            optimizer.zero_grad()
            ddp(x).backward()
            optimizer.step()
        return {name: value.detach().clone() for name, value in model.state_dict().items()}
    finally:
        quantizer_module.all_reduce_sum, quantizer_module.broadcast_from_first = saved


def _vqvae_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = {
            "synchronised": _train_tiny_vqvae(rank, synchronised=True),
            "unsynchronised": _train_tiny_vqvae(rank, synchronised=False),
        }
    finally:
        dist.destroy_process_group()


def test_ema_vqvae_state_is_bitwise_equal_on_two_processes_fed_different_data():
    results = mp.Manager().dict()
    mp.start_processes(
        _vqvae_worker, args=(_free_port(), results), nprocs=2, join=True, start_method="spawn"
    )
    first, second = results[0]["synchronised"], results[1]["synchronised"]
    assert first["quantizer.num_restarted"] > 0  # the restarts were exercised
    for name in first:  # codebook, EMA counts and sums, dead-code clocks, weights
        assert torch.equal(first[name], second[name]), name
    # Without the quantizer's collectives the same check fails: it can.
    first, second = results[0]["unsynchronised"], results[1]["unsynchronised"]
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert {"quantizer.codebook", "quantizer.ema_embed_sum"} <= set(differing)


# --- validation: 2 processes give the numbers of 1 ---------------------------------------------
VALIDATE_SCRIPT = """
import json, sys
import torch
import lightning.pytorch as pl
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from experiments.train import CONFIG_DIR, build_model
from vae.data.splits import ImageSplit

devices, size, out, models = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
torch.set_num_threads(1)
results = {}
for model_name in models:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}"])
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    split = datamodule.val_split
    datamodule.val_split = ImageSplit(split.images[:size], split.labels[:size])
    torch.manual_seed(0)  # the same weights in every process
    model = build_model(cfg.model, datamodule)
    if hasattr(model, "reparameterise"):
        # z = the posterior mean: one process and two draw different noise for the same
        # example, and the comparison is of the reductions across processes, not of noise.
        model.reparameterise = lambda mu, logvar: mu
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, datamodule=datamodule, verbose=False)
    results[model_name] = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
    }
if trainer.is_global_zero:
    json.dump(results, open(out, "w"))
"""

# An odd split: 51 and 50 examples on the two processes, so the check sees both what Lightning's
# DistributedSampler would repeat to even the shares and a synced mean that averaged the
# processes' example counts (101 / 2 -> 50); the DataModule's unrepeated sampler and the
# models' MeanMetric reductions give the one-process numbers.
VAL_SIZE = 101
MODELS = {
    "vae": ["val/elbo", "val/kl", "val/recon", "val/active_units"],
    "vqvae": ["val/recon", "val/perplexity", "val/codebook_usage"],
}
# Monte Carlo estimates over the gathered posteriors: their draws fall on other examples when
# the processes' halves are concatenated, so they agree with one process's only in
# distribution; their sum is checked instead.
KL_DECOMPOSITION = ("val/mutual_info", "val/total_correlation", "val/dimwise_kl")


def _validate(tmp_path: Path, devices: int) -> dict[str, dict[str, float]]:
    """``{model: val/* scalars}`` of ``trainer.validate`` on ``devices`` processes."""
    script, out = tmp_path / "validate.py", tmp_path / f"validate_{devices}.json"
    script.write_text(VALIDATE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(devices), str(VAL_SIZE), str(out), *MODELS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_validation_on_two_processes_equals_one_process(tmp_path: Path):
    ones, twos = _validate(tmp_path, 1), _validate(tmp_path, 2)
    for model, tags in MODELS.items():
        one, two = ones[model], twos[model]
        assert set(tags) <= set(one), model
        assert one.keys() == two.keys(), model
        for tag in set(one) - set(KL_DECOMPOSITION):
            assert two[tag] == pytest.approx(one[tag], rel=1e-5, abs=1e-6), (model, tag)
    parts = sum(twos["vae"][tag] for tag in KL_DECOMPOSITION)
    assert parts == pytest.approx(twos["vae"]["val/kl"], rel=1e-4, abs=1e-6)


# --- a Hydra multirun of DDP jobs -------------------------------------------------------------
@pytest.mark.slow
def test_multirun_of_ddp_jobs_writes_one_directory_per_job_and_finishes(tmp_path: Path):
    sweep = [
        "-m",
        "trainer=ddp_cpu",
        "model.beta=1,2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "threads=1",
        *QUICK,
    ]
    proc = run_cli("vae-train", *sweep, cwd=tmp_path, timeout=300)
    # Lightning re-runs the command line for rank 1: it must not start a sweep of its own.
    assert proc.stdout.count("Launching 2 jobs") == 1
    (sweep_dir,) = (tmp_path / "logs" / "vae_digits").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [job.name.split("_")[0] for job in jobs] == ["0", "1"]
    assert sorted(tmp_path.rglob("metrics.json")) == [job / "metrics.json" for job in jobs]
    for job, beta in zip(jobs, (1, 2), strict=True):
        assert read_metrics(job)["global_step"] == 2  # both processes took part
        assert f"model.beta-{beta}" in job.name
