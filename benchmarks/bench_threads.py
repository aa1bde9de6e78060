"""`threads=auto` against the best fixed thread count, on a busy machine and in a parallel sweep.

Each measurement is one real ``vae-train experiment=vae_fashion trainer.max_epochs=1`` (as
users run it, in a fresh process, without ``OMP_NUM_THREADS``), and its figure is
``train_samples_per_s`` from the run's ``metrics.json`` (training batches only: start-up and
validation excluded). Scenarios:

* ``quiet``: the run alone (auto must not lose where torch's old default was right);
* ``busy``: beside one busy process (``while True: pass`` in another Python);
* ``half_busy``: beside a process busy half the time (10 ms on, 10 ms off), the case that
  decides how auto rounds a part-busy core;
* ``sweep``: a 2-job sweep under Hydra's joblib launcher (``-m hydra/launcher=joblib
  hydra.launcher.n_jobs=2 seed=0,1``); its figure is the mean of the two jobs, and the sweep's
  wall time is kept too.

For each scenario, ``threads=auto`` and each fixed count (``--counts``, default 1 and 2)
alternate for ``--rounds`` rounds, the order rotating; reported: the median samples/s of each
setting, and ``auto_over_best`` = median(auto) / the best median of the fixed counts, plus the
count auto chose (read from train.log).

A timing means little while others load the machine (this one is shared), so each run also
measures the cores busy with anything but itself over its whole length (``/proc/stat`` less its
own CPU time): a run during which others kept more than ``--disturbed`` cores (0.15) busy
beyond this script's spinner is repeated after a pause (up to ``--attempts`` times; the discarded runs and a
``disturbed`` flag stay in the JSON).

    python benchmarks/bench_threads.py [--rounds 3] [--counts 1 2] [--scenarios quiet busy ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae.training.threads import available_cores, busy_cores, cpu_jiffies  # noqa: E402

VAE_TRAIN = str(Path(sys.executable).parent / "vae-train")
RUN = ["experiment=vae_fashion", "trainer.max_epochs=1", "trainer.accelerator=cpu"]
QUIET_OUTPUT = ["trainer.enable_progress_bar=false"]
SPINNERS = {
    "busy": "while True: pass",
    "half_busy": (
        "import time\n"
        "while True:\n"
        "    end = time.perf_counter() + 0.01\n"
        "    while time.perf_counter() < end: pass\n"
        "    time.sleep(0.01)\n"
    ),
}
SPINNER_CORES = {"busy": 1.0, "half_busy": 0.5}  # what the spinner itself keeps busy
CHOSEN = re.compile(r"Intra-op threads: (\d+) \((.*?)\)")


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) ticks of this process's CPUs since boot (``/proc/stat``)."""
    return cpu_jiffies(Path("/proc/stat").read_text(), os.sched_getaffinity(0))


def train(setting: str, workdir: Path, sweep: bool) -> dict:
    """One vae-train run (or 2-job sweep) with ``threads=setting``: samples/s per job, the
    count each job used, the wall time, and ``foreign_busy_cores``: the cores busy during the
    run with anything but it (this script's spinner included), from ``/proc/stat`` less the
    run's own CPU time (its processes and their children, once waited for)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    args = [*RUN, *QUIET_OUTPUT, f"threads={setting}", f"paths.log_dir={workdir}"]
    if sweep:
        args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *args]
    ticks, times, start = cpu_ticks(), os.times(), time.perf_counter()
    subprocess.run(
        [VAE_TRAIN, *args], env=env, check=True, capture_output=True, text=True, cwd=workdir
    )
    wall = time.perf_counter() - start
    after, times_after = cpu_ticks(), os.times()
    own = (times_after.children_user + times_after.children_system) - (
        times.children_user + times.children_system
    )
    busy = (after[0] - ticks[0]) / (after[1] - ticks[1]) * available_cores()
    jobs = sorted(workdir.rglob("metrics.json"))
    rates = [json.loads(p.read_text())["train_samples_per_s"] for p in jobs]
    chosen = [CHOSEN.search((p.parent / "train.log").read_text()).groups() for p in jobs]
    return {
        "samples_per_s": statistics.mean(rates),
        "jobs": rates,
        "chosen": chosen,
        "wall": wall,
        "foreign_busy_cores": max(busy - own / wall, 0.0),
    }


def undisturbed(setting: str, sweep: bool, expected: float, attempts: int, limit: float) -> dict:
    """``train`` again (up to ``attempts`` times, after a pause) while others kept more than
    ``limit`` cores busy beyond the ``expected`` spinner; the discarded runs stay in the record."""
    discarded = []
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as workdir:
            run = train(setting, Path(workdir), sweep)
        if run["foreign_busy_cores"] <= expected + limit or attempt == attempts - 1:
            return {
                **run,
                "disturbed": run["foreign_busy_cores"] > expected + limit,
                "discarded": discarded,
            }
        discarded.append(run)
        print(f"  disturbed ({run['foreign_busy_cores']:.2f} cores busy): again", flush=True)
        time.sleep(30)
    raise AssertionError("unreachable")


def scenario(name: str, settings: list[str], rounds: int, attempts: int, limit: float) -> dict:
    spinner = None
    if name in SPINNERS:
        spinner = subprocess.Popen([sys.executable, "-c", SPINNERS[name]])
        time.sleep(1.0)
    try:
        before = {"load_average": os.getloadavg(), "busy_cores_seen": busy_cores(1.0)}
        runs: dict[str, list[dict]] = {s: [] for s in settings}
        for round_ in range(rounds):
            order = settings[round_ % len(settings) :] + settings[: round_ % len(settings)]
            for setting in order:
                run = undisturbed(
                    setting, name == "sweep", SPINNER_CORES.get(name, 0.0), attempts, limit
                )
                runs[setting].append(run)
                print(
                    f"{name} round {round_} threads={setting}: "
                    f"{run['samples_per_s']:.0f} samples/s, chose {run['chosen']}, "
                    f"{run['foreign_busy_cores']:.2f} other cores busy",
                    flush=True,
                )
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    medians = {s: statistics.median(r["samples_per_s"] for r in runs[s]) for s in settings}
    fixed = {s: m for s, m in medians.items() if s != "auto"}
    best = max(fixed, key=fixed.get)
    return {
        **before,
        "load_average_after": os.getloadavg(),
        "median_samples_per_s": medians,
        "best_fixed": best,
        "auto_over_best": medians["auto"] / fixed[best],
        "auto_chose": sorted({c for r in runs["auto"] for c in r["chosen"]}),
        "median_wall_s": {s: statistics.median(r["wall"] for r in runs[s]) for s in settings},
        "disturbed_runs_kept": sum(r["disturbed"] for rs in runs.values() for r in rs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", nargs="+", default=["1", "2"])
    parser.add_argument("--scenarios", nargs="+", default=["quiet", "busy", "half_busy", "sweep"])
    parser.add_argument("--attempts", type=int, default=4, help="per run, while disturbed")
    parser.add_argument(
        "--disturbed", type=float, default=0.15, help="other cores busy that void a run"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/threads.json"))
    args = parser.parse_args()
    settings = ["auto", *args.counts]
    commit, changes = (
        subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        for a in (["rev-parse", "HEAD"], ["status", "--porcelain", "--", "vae", "experiments"])
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results = {
        n: scenario(n, settings, args.rounds, args.attempts, args.disturbed) for n in args.scenarios
    }
    result = {
        "benchmark": "threads",
        "setup": "vae-train " + " ".join(RUN) + " threads=<setting>; train_samples_per_s",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "uncommitted_changes": changes.splitlines(),
        "started": started,
        "cores": available_cores(),
        "rounds": args.rounds,
        "disturbed_above_cores": args.disturbed,
        "scenarios": results,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in results.items():
        shown = {k: v for k, v in row.items() if k != "runs"}
        print(name, json.dumps(shown))


if __name__ == "__main__":
    main()
