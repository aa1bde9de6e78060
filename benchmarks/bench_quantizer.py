"""Speed and memory of ``VectorQuantizer``'s training forward on CPU.

Speed (N = 65,536 latent vectors, K = 1,024 codes, D = 64, the issue's shapes):

* floor: a bare ``addmm`` of the scores ||e||^2 - 2 z.e over the whole (N, K) matrix, then
  ``argmin``: the least any exact nearest-code search has to do;
* ours: ``VectorQuantizer(ema=True)`` in training mode on channels-first z that requires grad:
  search, lookup, losses, straight-through, bincount/index_add_ EMA update, Laplace smoothing
  and dead-code restarts (``dead_code_threshold=1``, so every code unused in a batch is re-seeded
  at every step: the restart path always runs);
* one-hot reference: the common pattern this project avoids (full distance matrix with
  ||z||^2, an (N, K) one-hot, one-hot^T z for the EMA sums, one-hot @ codebook for the lookup).

* chunked floor: ``nearest_codes`` alone (the same search, chunked), to separate the cost of
  everything else from the search.

Each variant runs ``--repeats`` times, interleaved so that load from other processes hits
all of them alike. Medians and minima are both reported: on a shared machine the minimum is
the better estimate of the uncontended time.

Memory: each (variant, N) runs in a fresh subprocess with glibc's mmap threshold lowered to
64 KiB, so every large tensor is its own mapping that is returned to the system when freed
and the resident set tracks live tensors. The peak resident set (VmHWM, reset through
/proc/self/clear_refs after the inputs are built and a warm-up call has run) minus the
resident set before the call is the memory the forward needs on top of its inputs. Its
outputs (quantized: N x D floats, indices: N int64) necessarily grow with N; the scratch
beyond them should not.

    python benchmarks/bench_quantizer.py [--repeats 7] [--out benchmarks/results/quantizer.json]
"""

from __future__ import annotations

import argparse
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

from vae.nn.quantizer import VectorQuantizer, nearest_codes  # noqa: E402

NUM_CODES = 1024
CODE_DIM = 64
SPEED_N = 65_536
MEMORY_NS = (65_536, 131_072, 262_144)
GRID = 8  # z is (N / 64, D, 8, 8)


def latents(num_vectors: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_vectors // (GRID * GRID), CODE_DIM, GRID, GRID, generator=generator)


def bare_search(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    scores = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2)
    return scores.argmin(1)


class OneHotQuantizer:
    """The pattern to avoid: full distances, a dense one-hot, matmuls for lookup and EMA."""

    def __init__(self, codebook: torch.Tensor, decay: float = 0.99, eps: float = 1e-5):
        self.codebook = codebook.clone()
        self.ema_counts = torch.ones(codebook.shape[0])
        self.ema_embed_sum = codebook.clone()
        self.decay, self.eps = decay, eps

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, CODE_DIM)
        distances = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.codebook.t()
            + self.codebook.pow(2).sum(1)
        )
        one_hot = torch.nn.functional.one_hot(distances.argmin(1), NUM_CODES).float()
        quantized = one_hot @ self.codebook
        loss = 0.25 * (flat - quantized.detach()).pow(2).sum() / z.shape[0]
        with torch.no_grad():
            self.ema_counts.lerp_(one_hot.sum(0), 1 - self.decay)
            self.ema_embed_sum.lerp_(one_hot.t() @ flat, 1 - self.decay)
            total = self.ema_counts.sum()
            smoothed = (self.ema_counts + self.eps) / (total + NUM_CODES * self.eps) * total
            self.codebook = self.ema_embed_sum / smoothed[:, None]
        out = flat + (quantized - flat).detach()
        return out.reshape(z.shape[0], GRID, GRID, CODE_DIM).permute(0, 3, 1, 2), loss


def make_quantizer(seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    quantizer = VectorQuantizer(NUM_CODES, CODE_DIM, ema=True, dead_code_threshold=1)
    # Codes drawn like the data, so that the search is not degenerate (all codes in use).
    quantizer._set_codes(torch.arange(NUM_CODES), torch.randn(NUM_CODES, CODE_DIM))
    return quantizer.train()


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def time_variants(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` rounds alternating between them after one
    warm-up call each (allocator, thread pool)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def speed(repeats: int) -> dict:
    z = latents(SPEED_N).requires_grad_(True)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, CODE_DIM).contiguous()
    quantizer = make_quantizer()
    one_hot = OneHotQuantizer(quantizer.codebook)
    codebook = quantizer.codebook.clone()
    variants = {
        "floor_addmm_argmin": lambda: bare_search(flat, codebook),
        "chunked_addmm_argmin": lambda: nearest_codes(flat, codebook),
        "vector_quantizer_train_forward": lambda: quantizer(z),
        "one_hot_reference": lambda: one_hot(z),
    }
    times = time_variants(variants, repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    return {
        "shapes": {"N": SPEED_N, "K": NUM_CODES, "D": CODE_DIM},
        "median_s": medians,
        "min_s": minima,
        "all_s": times,
        "ratio_to_floor_median": {
            name: value / medians["floor_addmm_argmin"] for name, value in medians.items()
        },
        "ratio_to_floor_min": {
            name: value / minima["floor_addmm_argmin"] for name, value in minima.items()
        },
        "restarts_per_step_last": int(quantizer(z).dead_codes),
    }


# --- memory: one subprocess per measurement -------------------------------------------------


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory_here(variant: str, num_vectors: int) -> dict:
    z = latents(num_vectors).requires_grad_(True)
    if variant == "vector_quantizer":
        quantizer = make_quantizer()
        run = quantizer
    else:
        run = OneHotQuantizer(make_quantizer().codebook)
    out = run(z)  # warm-up
    del out
    before = _resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = run(z)  # kept alive: its outputs are part of the peak
    peak = _resident_kib("VmHWM")
    del out
    return {"rss_before_kib": before, "peak_kib": peak, "extra_mib": (peak - before) / 1024}


def measure_memory(variant: str, num_vectors: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", variant, str(num_vectors)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(variants: tuple[str, ...]) -> dict:
    results: dict[str, dict] = {}
    output_mib = {n: n * (CODE_DIM * 4 + 8) / 2**20 for n in MEMORY_NS}
    for variant in variants:
        rows = {}
        for n in MEMORY_NS:
            measured = measure_memory(variant, n)
            measured["outputs_mib"] = output_mib[n]
            measured["scratch_mib"] = measured["extra_mib"] - output_mib[n]
            rows[str(n)] = measured
        results[variant] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory_here(args.memory_child[0], int(args.memory_child[1]))))
        return
    result = {
        "benchmark": "quantizer",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "speed": speed(args.repeats),
        "memory_mib": memory(("vector_quantizer", "one_hot_reference")),
        "memory_method": (
            "peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS before one training "
            "forward, fresh subprocess per point, MALLOC_MMAP_THRESHOLD_=65536; scratch_mib "
            "subtracts the N-proportional outputs (quantized N*D float32 + indices N int64)"
        ),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
