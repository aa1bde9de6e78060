"""FSQ's forward against the VQ nearest-code search on CPU, at a matched code count.

N = 65,536 latent vectors (as ``bench_quantizer.py``), 1,000 codes on both sides:

* vq_search: ``nearest_codes`` alone, K = 1,000 codes of D = 64 (the exact chunked search);
* vq_train_forward: ``VectorQuantizer(ema=True)`` in training mode on channels-first z that
  requires grad (search, lookup, losses, straight-through, EMA update, dead-code tracking);
* fsq_train_forward: ``FiniteScalarQuantizer([8, 5, 5, 5])`` (1,000 codes of d = 4) in
  training mode on z (N / 64, 4, 8, 8) that requires grad: bound, round, straight-through,
  implicit indices, histogram and perplexity.

The VQ side quantizes 64-channel vectors and FSQ 4-channel ones: each at the code size it is
used with (the encoder's output is 64 or 4 channels wide). Each variant runs ``--repeats``
times, interleaved, so that load from other processes hits all alike; medians and minima are
reported (on a shared machine the minimum is the better estimate of the uncontended time).

    OMP_NUM_THREADS=1 python benchmarks/bench_fsq.py [--repeats 7] [--out benchmarks/results/fsq.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae.nn.fsq import FiniteScalarQuantizer  # noqa: E402
from vae.nn.quantizer import VectorQuantizer, nearest_codes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantizer import time_variants  # noqa: E402

NUM_VECTORS = 65_536
LEVELS = (8, 5, 5, 5)  # 1,000 codes
VQ_CODE_DIM = 64
GRID = 8  # z is (N / 64, channels, 8, 8)


def latents(channels: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_VECTORS // (GRID * GRID), channels, GRID, GRID, generator=generator)


def make_vector_quantizer(num_codes: int, seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    quantizer = VectorQuantizer(num_codes, VQ_CODE_DIM, ema=True)
    # Codes drawn like the data, so that the search is not degenerate (all codes in use).
    quantizer._set_codes(torch.arange(num_codes), torch.randn(num_codes, VQ_CODE_DIM))
    return quantizer.train()


def speed(repeats: int) -> dict:
    fsq = FiniteScalarQuantizer(LEVELS).train()
    vq = make_vector_quantizer(fsq.num_codes)
    z_vq = latents(VQ_CODE_DIM).requires_grad_(True)
    z_fsq = latents(fsq.code_dim).requires_grad_(True)
    flat = z_vq.detach().movedim(1, -1).reshape(-1, VQ_CODE_DIM).contiguous()
    codebook = vq.codebook.clone()
    variants = {
        "vq_search": lambda: nearest_codes(flat, codebook),
        "vq_train_forward": lambda: vq(z_vq),
        "fsq_train_forward": lambda: fsq(z_fsq),
    }
    times = time_variants(variants, repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    return {
        "shapes": {
            "N": NUM_VECTORS,
            "vq": {"K": vq.num_codes, "D": VQ_CODE_DIM},
            "fsq": {"levels": list(LEVELS), "K": fsq.num_codes, "d": fsq.code_dim},
        },
        "median_s": medians,
        "min_s": minima,
        "all_s": times,
        "fsq_forward_over_vq_search": {
            "median": medians["fsq_train_forward"] / medians["vq_search"],
            "min": minima["fsq_train_forward"] / minima["vq_search"],
        },
        "fsq_forward_over_vq_forward": {
            "median": medians["fsq_train_forward"] / medians["vq_train_forward"],
            "min": minima["fsq_train_forward"] / minima["vq_train_forward"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="", help="load on the machine while it ran, etc.")
    args = parser.parse_args()
    result = {
        "benchmark": "fsq",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "note": args.note,
        "speed": speed(args.repeats),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
