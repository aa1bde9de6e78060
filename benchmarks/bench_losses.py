"""Time gaussian_kl (forward + backward) against the torch.distributions path.

    python benchmarks/bench_losses.py [--rounds 15] [--min-time 0.05] [--devices cpu cuda]
        [--out benchmarks/results/losses.json]

For each shape (batch, latent) in {(128, 16), (4096, 256)} and each device, it times one
training-style step, KL summed and back-propagated to (mu, logvar):

* ``ours``:      vae.losses.gaussian_kl(mu, logvar), value checks on (the default)
* ``ours_fast``: the same with validate=False (the hot path the models use)
* ``td``:        kl_divergence(Normal(mu, exp(0.5 * logvar)), Normal(0, 1)), torch defaults
                 (argument validation on, like ours)
* ``td_fast``:   the same with validate_args=False

and reports ``speedup = td / ours`` and ``speedup_fast = td_fast / ours_fast`` (like for
like), and the validation cost ``ours / ours_fast``. Times are the best round of several,
interleaved across variants (robust to other load on a shared machine). Writes JSON (each run
records the git commit it measured) and prints a markdown table. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.distributions import Normal, kl_divergence

from vae.losses import gaussian_kl

SHAPES = [(128, 16), (4096, 256)]
DEFAULT_OUT = Path(__file__).parent / "results" / "losses.json"
BENCHMARK = "gaussian_kl forward+backward vs torch.distributions Normal/kl_divergence"


def _ours(mu, logvar, validate):
    gaussian_kl(mu, logvar, validate=validate).sum().backward()


def _torch_distributions(mu, logvar, validate):
    q = Normal(mu, torch.exp(0.5 * logvar), validate_args=validate)
    p = Normal(
        torch.zeros((), device=mu.device), torch.ones((), device=mu.device), validate_args=validate
    )
    kl_divergence(q, p).sum().backward()


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(variants, device, rounds, min_time_per_round):
    """Best time per call (microseconds) of each variant, measured round-robin.

    Interleaving the variants and keeping each one's fastest round makes the comparison fair
    on a shared machine: background load slows whichever variant it happens to hit, and the
    minimum discards those rounds.
    """
    numbers = {}
    for name, fn in variants.items():  # calibrate calls per round to ~min_time_per_round
        number, elapsed = 1, 0.0
        while elapsed < min_time_per_round:
            number *= 2
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            _synchronize(device)
            elapsed = time.perf_counter() - start
        numbers[name] = number
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, fn in variants.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            _synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / numbers[name])
    return {name: t * 1e6 for name, t in best.items()}


def run(devices, rounds, min_time):
    rows = []
    for device in devices:
        for batch, latent in SHAPES:
            g = torch.Generator().manual_seed(0)
            mu = torch.randn(batch, latent, generator=g).to(device).requires_grad_()
            logvar = torch.randn(batch, latent, generator=g).to(device).requires_grad_()
            # Same numbers before timing anything.
            torch.testing.assert_close(
                gaussian_kl(mu, logvar),
                kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)),
                rtol=1e-4,
                atol=1e-5,
            )

            def step(fn, validate, mu=mu, logvar=logvar):
                fn(mu, logvar, validate)
                mu.grad = logvar.grad = None

            variants = {
                "ours_us": lambda: step(_ours, True),
                "ours_fast_us": lambda: step(_ours, False),
                "td_us": lambda: step(_torch_distributions, True),
                "td_fast_us": lambda: step(_torch_distributions, False),
            }
            for fn in variants.values():  # warm-up (CUDA context, allocator)
                fn()
            times = _time_interleaved(variants, device, rounds, min_time)
            rows.append(
                {
                    "device": device,
                    "shape": [batch, latent],
                    **{k: round(v, 2) for k, v in times.items()},
                    "speedup": round(times["td_us"] / times["ours_us"], 2),
                    "speedup_fast": round(times["td_fast_us"] / times["ours_fast_us"], 2),
                    "validation_cost": round(times["ours_us"] / times["ours_fast_us"], 2),
                }
            )
    return rows


def git_commit():
    """The commit whose gaussian_kl was timed (None outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def markdown(rows):
    lines = [
        "| device | shape | ours (us) | ours, validate=False (us) | torch.distributions (us) "
        "| td, validate_args=False (us) | speedup | speedup, no validation | validation cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {tuple(r['shape'])} | {r['ours_us']:.1f} | {r['ours_fast_us']:.1f} "
            f"| {r['td_us']:.1f} | {r['td_fast_us']:.1f} | {r['speedup']:.2f}x "
            f"| {r['speedup_fast']:.2f}x | {r['validation_cost']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per variant")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per round")
    parser.add_argument(
        "--devices", nargs="+", default=None, help="default: cpu, and cuda if present"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--label", default=platform.node(), help="name of this machine's run")
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = run(devices, args.rounds, args.min_time)
    run_record = {
        "label": args.label,
        "commit": git_commit(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "timing": f"best of {args.rounds} interleaved rounds of >= {args.min_time} s each",
        "devices": {d: device_name(d) for d in devices},
        "results": rows,
    }
    # One file collects runs from several machines; a run replaces an earlier one of its label.
    result = {"benchmark": BENCHMARK, "runs": []}
    if args.out.exists():
        result = json.loads(args.out.read_text())
    result["runs"] = [r for r in result.get("runs", []) if r.get("label") != args.label]
    result["runs"].append(run_record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    print(f"\nwrote run {args.label!r} to {args.out}")


if __name__ == "__main__":
    main()
