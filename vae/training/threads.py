"""How many threads torch uses inside one op (intra-op threads), chosen once when a run starts.

torch's default is one thread per core the process may run on: right for one run on an idle
machine, and badly wrong otherwise. The threads of an op wait for each other at its end, so
when another process holds one of the cores, every op waits for the thread that lost its core.
On this project's 2-core VM, one epoch of ``vae_fashion`` beside one busy process ran 2.6x
slower with 2 threads than with 1, and a 2-job sweep with 2 threads per job 3.3x slower
(``benchmarks/bench_threads.py``; the README's benchmark table).

The top-level config key ``threads`` decides:

* an integer: that many threads;
* ``auto`` (the default): ``OMP_NUM_THREADS`` when the environment sets it; otherwise

      threads = max(1, min(cores // jobs, cores - round(busy)))

  cores: the CPUs this process may run on (its affinity mask); jobs: the processes that run
  at once, i.e. the parallel jobs of a sweep (Hydra's joblib launcher: ``hydra.launcher.n_jobs``,
  -1 meaning one per core, as joblib counts) times the processes of one run (DDP: one per
  device); busy: the cores that other processes kept busy during 0.2 s before the choice
  (``/proc/stat``). That is the run's fair share of the cores, and never more than the idle
  ones. Measured once: a neighbour that starts later is not seen.

Hydra's joblib launcher itself sets ``OMP_NUM_THREADS`` = cores // n_jobs in each job unless
the user set it; that value is joblib's guess, not the user's, so ``auto`` refines it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

STAT_FILE = "/proc/stat"
SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def choose_threads(
    setting: int | str,
    *,
    cores: int,
    jobs: int = 1,
    busy: float = 0.0,
    omp_num_threads: str | None = None,
) -> ThreadChoice:
    """The intra-op thread count for ``setting`` (the ``threads`` key: a positive integer or
    ``"auto"``), with the reason the log gives.

    ``cores``: CPUs this process may use; ``jobs``: processes running at once on them (sweep
    jobs × DDP processes); ``busy``: cores in use by other processes (a fraction of cores,
    e.g. 0.97); ``omp_num_threads``: ``OMP_NUM_THREADS`` as the user set it, or None. Pure: the caller
    measures.
    """
    if setting != "auto":
        return ThreadChoice(int(setting), f"threads={setting}")
    user = _positive_int(omp_num_threads)
    if user is not None:
        return ThreadChoice(user, f"OMP_NUM_THREADS={omp_num_threads} from the environment")
    share = cores // max(jobs, 1)
    # A core busy about half the time counts as busy from 0.5 up (round half to even leaves
    # exactly 0.5 idle): beside one, 1 and 2 threads ran within 4% (the benchmark's half_busy).
    idle = cores - round(busy)
    threads = max(1, min(share, idle))
    shared = f" shared by {jobs} parallel processes" if jobs > 1 else ""
    return ThreadChoice(
        threads,
        f"auto: {cores} cores{shared}, {busy:.1f} busy with other processes",
    )


def _positive_int(text: str | None) -> int | None:
    """``OMP_NUM_THREADS`` as a count: its first entry (OpenMP allows "4,2" for nested levels);
    None when unset or not a positive integer (OpenMP ignores such a value too)."""
    try:
        value = int((text or "").split(",")[0])
    except ValueError:
        return None
    return value if value > 0 else None


# --- measuring the inputs --------------------------------------------------------------------
def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_jiffies(stat_text: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks summed over ``cpus`` from the text of ``/proc/stat``.

    Each ``cpuN`` line counts ticks since boot: user nice system idle iowait irq softirq steal
    (guest time is already inside user). Idle is idle + iowait; busy is the rest.
    """
    busy = total = 0
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields[:8]]
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores kept busy by other processes over the next ``seconds``: the busy fraction of this
    process's CPUs between two reads of ``/proc/stat``, times their count, less this process's
    own CPU time. 0.0 where ``/proc/stat`` cannot be read (not Linux)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        before = cpu_jiffies(Path(STAT_FILE).read_text(), cpus)
        own_before, wall_before = time.process_time(), time.perf_counter()
        time.sleep(seconds)
        after = cpu_jiffies(Path(STAT_FILE).read_text(), cpus)
        own = (time.process_time() - own_before) / (time.perf_counter() - wall_before)
    except (OSError, ValueError):
        return 0.0
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    return max(0.0, busy / total * len(cpus) - own)


def parallel_jobs(launcher=None) -> int:
    """Jobs of a Hydra sweep that run at once under ``launcher`` (the ``hydra.launcher``
    config; default: this job's): ``n_jobs`` of the joblib launcher (a negative n meaning
    cores + 1 + n, joblib's rule), 1 for anything else (the basic launcher runs one at a time)."""
    if launcher is None:
        launcher = _hydra_launcher()
    if launcher is None or "joblib" not in str(launcher.get("_target_", "")):
        return 1
    from joblib import effective_n_jobs

    return effective_n_jobs(launcher.get("n_jobs", -1))


def _hydra_launcher():
    """This job's ``hydra.launcher`` config, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().launcher if HydraConfig.initialized() else None


def _joblib_default(jobs: int) -> str:
    """The ``OMP_NUM_THREADS`` that joblib's process pool gives each of ``jobs`` workers when
    the user set none (``joblib._parallel_backends``: cpu_count() // n_jobs, at least 1)."""
    from joblib import cpu_count

    return str(max(cpu_count() // jobs, 1))


def apply_threads(setting: int | str = "auto", processes: int = 1) -> str:
    """Set torch's intra-op threads as ``setting`` asks (see the module docstring) and return
    the line for ``train.log``. ``processes``: the processes of this run (DDP: one per device);
    they share the cores, so their count is exported as ``OMP_NUM_THREADS``, which Lightning's
    DDP launcher then keeps and passes on to the processes it starts."""
    import torch

    jobs = parallel_jobs()
    omp = os.environ.get("OMP_NUM_THREADS")
    note = ""
    if jobs > 1 and omp == _joblib_default(jobs):
        omp, note = None, f"; joblib's OMP_NUM_THREADS={omp} for its jobs not used"
    measure = setting == "auto" and _positive_int(omp) is None
    choice = choose_threads(
        setting,
        cores=available_cores(),
        jobs=jobs * processes,
        busy=busy_cores() if measure else 0.0,
        omp_num_threads=omp,
    )
    torch.set_num_threads(choice.threads)
    if processes > 1:
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    return f"Intra-op threads: {choice.threads} ({choice.reason}{note}); set them with threads=N"
