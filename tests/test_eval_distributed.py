"""`vae-eval` on two processes (torchrun, gloo): the split's batches are shared and gathered, and
the test numbers equal those of one process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli import QUICK, last_line, run_cli
from vae.eval.suite import batch_seed, shard_of_batches
from vae.training import tags

EVAL = ["eval.k=8", "eval.batch_size=32", "eval.sample_scores=false"]
EVAL += ["eval.device=cpu", "threads=1"]


def test_shards_are_contiguous_blocks_that_cover_the_split_in_order():
    for num_batches in (2, 7, 8, 13):
        for world_size in (1, 2, 3):
            if num_batches < world_size:
                continue
            blocks = [list(shard_of_batches(num_batches, r, world_size)) for r in range(world_size)]
            assert sum(blocks, []) == list(range(num_batches))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ValueError, match="2 batches cannot be shared by 3 processes"):
        shard_of_batches(2, 0, 3)


def test_batch_seeds_are_distinct():
    seeds = {batch_seed(s, b) for s in range(5) for b in range(1000)}
    assert len(seeds) == 5000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_processes_give_the_numbers_of_one(tmp_path: Path):
    run = tmp_path / last_line(
        run_cli("vae-train", "trainer.max_epochs=1", *QUICK, cwd=tmp_path).stdout
    )
    ckpt = f"ckpt_path='{run / 'checkpoints' / 'last.ckpt'}'"

    run_cli("vae-eval", ckpt, *EVAL, cwd=tmp_path)
    alone = json.loads((run / "metrics.json").read_text())

    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "--no-python"]
    proc = subprocess.run(
        [*torchrun, str(Path(sys.executable).parent / "vae-eval"), ckpt, *EVAL],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Written to") == 1  # rank 0 alone reports and writes
    shared = json.loads((run / "metrics.json").read_text())

    assert (
        shared[tags.TEST_NUM_EXAMPLES] == alone[tags.TEST_NUM_EXAMPLES] == 180
    )  # the digits test split
    for tag in (tags.TEST_NLL_IW, tags.TEST_ELBO, tags.TEST_RECON, tags.TEST_KL):
        assert shared[tag] == pytest.approx(alone[tag], rel=1e-9), tag
    assert shared[tags.TEST_KL_PER_DIM] == pytest.approx(alone[tags.TEST_KL_PER_DIM], rel=1e-9)
    assert shared[tags.TEST_ACTIVE_UNITS] == alone[tags.TEST_ACTIVE_UNITS]
    for name in tags.KL_DECOMPOSITION:  # the gathered posteriors, in the split's order
        tag = tags.tag("test", name)
        assert shared[tag] == pytest.approx(alone[tag], rel=1e-6, abs=1e-9), tag
