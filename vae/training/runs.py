"""Run directories and the files in them, in one place: how a run directory is named and
found again on resume (the resolvers of ``conf/hydra/default.yaml``), ``metrics.json``, and the
clean-up of a run that failed before it started."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
CONFIG_FILE = Path(".hydra") / "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping them
    return value


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_metrics(
    run_dir: str | os.PathLike, metrics: Mapping[str, Any], merge: bool = True
) -> Path:
    """Write ``metrics.json`` atomically (temp file + rename), merging with what is there.

    Keys are TensorBoard tag names (``val/elbo``, ``test/nll_iw``) plus run-level numbers such
    as ``train_samples_per_s``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    merged = read_metrics(run_dir) if merge else {}
    merged.update({key: _jsonable(value) for key, value in metrics.items()})
    text = json.dumps(dict(sorted(merged.items())), indent=2) + "\n"
    return write_atomically(run_dir / METRICS_FILE, text)


def write_atomically(path: Path, text: str) -> Path:
    """Replace ``path`` by ``text`` in one step (temp file + rename), with the umask's mode."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    from vae.training.checkpoints import umask_mode  # torch: not on the CLI's start-up path

    os.chmod(temporary, umask_mode())  # mkstemp's 0600 would differ from the run's other files
    os.replace(temporary, path)
    return path


# --- run directories: where a run writes, named by Hydra's resolvers (conf/hydra/default.yaml) --
# Names this process's resume attempt (config folder and log), fixed once per process so that
# every place that resolves it agrees.
ATTEMPT = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"

# Characters that Hydra's override grammar (and shells) would need quoted in a later
# `ckpt_path=<run dir>/checkpoints/last.ckpt`, mapped to ones that need no quoting.
_PATH_SAFE = str.maketrans(
    {"/": "-", "=": "-", ",": "+", "~": "del-", **dict.fromkeys("[] '\"(){}", None)}
)


def dir_suffix(overrides: str, limit: int = 120) -> str:
    """``_model.beta-4__model.latent_dim-16`` from Hydra's override_dirname (``kv_sep: -``,
    ``item_sep: __``): one path component that can be pasted unquoted into ``ckpt_path=``.

    An over-long suffix is cut and ends in ``__sha1-`` and a hash of the whole text, so that
    distinct overrides still give distinct names (and no character that Hydra's override
    grammar rejects unquoted, such as ``~``).
    """
    if not overrides:
        return ""
    text = overrides.translate(_PATH_SAFE)
    if len(text) > limit:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[: limit - 15]}__sha1-{digest}"
    return f"_{text}"


def resumed_run_dir(ckpt_path: str | None) -> Path | None:
    """The run a checkpoint belongs to (``<run>/checkpoints/*.ckpt``), or None: a new run."""
    if not ckpt_path:
        return None
    checkpoint = Path(ckpt_path).expanduser().resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else None


def resume_dir(ckpt_path: str | None, new_run_dir: str) -> str:
    """Where a run writes: the checkpoint's own run directory when resuming, else a new one."""
    resumed = resumed_run_dir(ckpt_path)
    return str(resumed) if resumed is not None else new_run_dir


def _resumes(ckpt_path: str | None, output_dir: str | None) -> bool:
    return resumed_run_dir(ckpt_path) is not None or (
        not ckpt_path and output_dir is not None and requeued_checkpoint(output_dir) is not None
    )


def config_subdir(ckpt_path: str | None, output_dir: str | None = None) -> str:
    """Hydra's config folder: ``.hydra`` for a new run; a resumed run (``ckpt_path``, or a
    requeued SLURM job in its run ``output_dir``) keeps the original ``.hydra/config.yaml`` and
    records its own under ``.hydra/resume_<time>``."""
    return f".hydra/resume_{ATTEMPT}" if _resumes(ckpt_path, output_dir) else ".hydra"


def log_file_name(ckpt_path: str | None, output_dir: str | None = None) -> str:
    """The job log: ``train.log``; a resume logs to its own file and leaves the first alone."""
    return f"train_resume_{ATTEMPT}.log" if _resumes(ckpt_path, output_dir) else "train.log"


# --- SLURM: a requeued job finds its run by the job id -----------------------------------------
# Job names SLURM gives an interactive allocation (Lightning's SLURMEnvironment.detect agrees):
# runs started by hand there are named like runs anywhere else.
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def slurm_batch_job_id() -> str | None:
    """``SLURM_JOB_ID`` in a SLURM batch job (sbatch, submitit), else None. A job keeps its id
    when it is requeued (``scontrol requeue``; ``SLURM_RESTART_COUNT`` counts the restarts)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or os.environ.get("SLURM_JOB_NAME") in _INTERACTIVE_JOB_NAMES:
        return None
    return job_id


def run_stamp() -> str:
    """The part of a run directory's name that makes it unique: ``<date>_<time>_<random id>``,
    or ``slurm-<job id>`` in a SLURM batch job, so that the job, requeued after a preemption
    or a time limit, computes the same directory and resumes its run there."""
    job_id = slurm_batch_job_id()
    if job_id is not None:
        return f"slurm-{job_id}"
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


def _slurm_restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeued_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``<run_dir>/checkpoints/last.ckpt`` when this is a SLURM batch job and that file exists:
    the job was requeued (by Lightning's SLURM plugin on ``SIGUSR1``, or by submitit) and
    continues its run from there. None otherwise: a new run."""
    if slurm_batch_job_id() is None:
        return None
    last = Path(run_dir) / CHECKPOINT_DIR / "last.ckpt"
    return last if last.is_file() else None


def resume_target(path: str) -> str:
    """``ckpt_path`` as a checkpoint file: a run directory or its ``checkpoints/`` folder means
    that run's ``last.ckpt``; anything else is returned as given (and checked later)."""
    folder = Path(path).expanduser()
    for candidate in (folder / CHECKPOINT_DIR / "last.ckpt", folder / "last.ckpt"):
        if folder.is_dir() and candidate.is_file():
            return str(candidate)
    return path


# Overrides that belong to one attempt, never carried over to the next one.
ATTEMPT_KEYS = ("ckpt_path", "rollback")


def _override_key(override: str) -> str:
    from vae.training.config import split_override

    return split_override(override)[1]


def with_recorded_overrides(overrides: list[str]) -> list[str]:
    """The command line of a resume, completed with the run's own recorded overrides.

    ``vae-train ckpt_path=<run> trainer.max_epochs=8`` continues the run with the overrides it
    was trained with (``<run>/.hydra/overrides.yaml``: the first attempt's, or the latest
    resume's); only the keys given now change. A recorded ``+key=`` keeps its ``+`` when the
    new command line sets that key. Options (``-m``, ``--cfg``) and anything without a
    ``ckpt_path`` are returned unchanged.
    """
    given = [o for o in overrides if not o.startswith("-")]
    paths = [o.partition("=")[2] for o in given if _override_key(o) == "ckpt_path"]
    if not paths or not paths[-1] or any(o in ("-m", "--multirun") for o in overrides):
        return overrides
    checkpoint = resume_target(paths[-1])
    run_dir = resumed_run_dir(checkpoint)
    recorded_file = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    if recorded_file is None or not recorded_file.is_file():
        return [
            f"ckpt_path={checkpoint}" if o in given and _override_key(o) == "ckpt_path" else o
            for o in overrides
        ]
    import yaml

    recorded = yaml.safe_load(recorded_file.read_text()) or []
    keys_now = {_override_key(o): o for o in given}
    kept = [o for o in recorded if _override_key(o) not in (*keys_now, *ATTEMPT_KEYS)]
    prefixes = {_override_key(o): o[: len(o) - len(o.lstrip("+"))] for o in recorded}
    completed = []
    for override in overrides:
        key = _override_key(override)
        if key == "ckpt_path" and not override.startswith("-"):
            override = f"ckpt_path={checkpoint}"
        elif prefixes.get(key) and not override.startswith(("+", "~", "-")):
            override = prefixes[key] + override
        completed.append(override)
    return [*kept, *completed]


def record_latest_config(run_dir: Path, attempt_folder: str) -> list[str]:
    """Make ``<run>/.hydra/{config,overrides,hydra}.yaml`` the files of this resume attempt,
    where vae-eval, vae-compare and the next resume read them; the first attempt's files are
    kept once in ``.hydra/first/`` and each resume's in its own ``.hydra/resume_<time>/``.

    Returns the config keys whose values differ from the previous latest config, as
    ``"key: old -> new"`` lines (also the keys a changed ``conf/`` default moved).
    """
    import yaml
    from omegaconf import OmegaConf

    from vae.training.tensorboard import flatten_config

    hydra_dir, attempt = run_dir / ".hydra", run_dir / attempt_folder
    first = hydra_dir / "first"
    if not first.exists():
        first.mkdir()
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            if (hydra_dir / name).is_file():
                shutil.copy2(hydra_dir / name, first / name)
    before = flatten_config(OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml")))
    after = flatten_config(OmegaConf.to_container(OmegaConf.load(attempt / "config.yaml")))
    overrides = yaml.safe_load((attempt / "overrides.yaml").read_text()) or []
    effective = [o for o in overrides if _override_key(o) not in ATTEMPT_KEYS]
    for name, text in (
        ("config.yaml", (attempt / "config.yaml").read_text()),
        ("hydra.yaml", (attempt / "hydra.yaml").read_text()),
        ("overrides.yaml", yaml.safe_dump(effective, default_flow_style=False)),
    ):
        write_atomically(hydra_dir / name, text)
    return [
        f"{key}: {before.get(key, '<absent>')} -> {after.get(key, '<absent>')}"
        for key in sorted(before.keys() | after.keys())
        if key not in ATTEMPT_KEYS and before.get(key, "<absent>") != after.get(key, "<absent>")
    ]


def group_choice(group: str, *, _root_: Any) -> str:
    """The option chosen for a config group (``${choice:model}`` -> ``vae``), read from the
    composed config's ``hydra`` node where present (also while a multirun names its sweep
    directory), else from HydraConfig."""
    from omegaconf import OmegaConf

    choices = OmegaConf.select(_root_, "hydra.runtime.choices")
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    return str(choices.get(group))


def register_resolvers() -> None:
    """The OmegaConf resolvers that ``conf/`` uses to name run directories."""
    from omegaconf import OmegaConf

    cached = {
        "resume_dir": resume_dir,
        "config_subdir": config_subdir,
        "log_file_name": log_file_name,
        "run_stamp": run_stamp,  # one value per process: the run and sweep dirs share it
    }
    for name, function in cached.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=True)
    for name, function in {"choice": group_choice, "dir_suffix": dir_suffix}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


def discard_unused_outputs(
    run_dir: Path, config_folder: str | None, log_file: str | None, log_dir: Path | None = None
) -> None:
    """Undo what Hydra wrote for a run that failed before it started.

    A new run directory holding nothing but Hydra's own files is removed whole, and so are the
    folders above it, up to ``log_dir``, that it leaves empty (``<log_dir>/<name>/``). Resuming
    into an existing run only removes this attempt's own config folder and log, so the run's
    checkpoints, events, metrics and first config stay exactly as they were.
    """
    if not run_dir.is_dir():
        return
    if config_folder and config_folder != ".hydra":  # a resume attempt
        shutil.rmtree(run_dir / config_folder, ignore_errors=True)
        if log_file:
            logging.shutdown()
            Path(log_file).unlink(missing_ok=True)
        return
    produced = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if produced:
        return
    logging.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)
    if log_dir is None:
        return
    log_dir = log_dir.resolve()
    for folder in run_dir.resolve().parents:
        if folder != log_dir and log_dir not in folder.parents:
            break
        try:
            folder.rmdir()  # only if empty: another run may live there
        except OSError:
            break


MIN_FREE_BYTES = 1 << 20
"""Less free space than this where runs are written refuses a new run: the config files would
fit, the first checkpoint would not."""


def log_dir_problem(log_dir: str | os.PathLike) -> str | None:
    """Why runs cannot be written under ``log_dir`` (to be created if missing), or None.

    Checks the nearest folder that exists: that it is a folder, that this process may create
    files in it, and that its disk is not full."""
    existing = Path(log_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return f"the disk holding {existing} is full ({free} bytes free)"
    return None


try:  # Hydra is a dependency of the CLIs; vae.training.runs stays importable without it
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class CheckLogDir(_HydraCallback):
    """A Hydra callback (``conf/hydra/default.yaml``) that refuses an unusable ``paths.log_dir``
    before Hydra creates the run directory in it: one line, exit 2, nothing written."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: Any) -> None:
        import sys

        log_dir = config.paths.log_dir
        problem = log_dir_problem(log_dir)
        if problem is not None:
            print(
                f"vae-train: error: paths.log_dir={log_dir} cannot hold runs: {problem}. "
                "Choose another folder with paths.log_dir=...",
                file=sys.stderr,
            )
            sys.exit(2)


# --- one writer per run directory --------------------------------------------------------------
LOCK_FILE = ".writer.lock"


class RunLockedError(RuntimeError):
    """Another process is writing into the run directory; the message names it."""


@contextlib.contextmanager
def _directory_locked(folder: Path) -> Iterator[None]:
    """Hold ``flock`` on ``folder`` (exclusive, blocking) for the duration of the block."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class RunLock:
    """An exclusive lock on a run directory: ``<run>/.writer.lock`` holds the writer's pid, host
    and start time, created with ``O_EXCL`` so that of two writers exactly one gets it.

    A lock left by a process that is gone (same host, pid no longer running, e.g. after a
    SIGKILL) is stale and is taken over. A lock from another host cannot be checked and is
    respected: the message says which file to delete if that writer is known to be dead.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        # Checked and created under a kernel lock on the run directory, so that two writers
        # never interleave: neither reads the other's lock file before its record is written,
        # nor removes a lock the other has just put in place of a stale one. The kernel drops
        # that lock when its process dies, so it cannot go stale itself.
        with _directory_locked(self.path.parent):
            return self._acquire()

    def _acquire(self) -> RunLock:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._is_stale(holder):
                    raise RunLockedError(self._message(holder)) from None
                logging.getLogger(__name__).info("Taking over a stale lock: %s", holder)
                self.path.unlink(missing_ok=True)
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            if slurm_batch_job_id() is not None:
                record.update(slurm_job=slurm_batch_job_id(), slurm_restart=_slurm_restart_count())
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}; another writer keeps taking it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written or unreadable: its writer died while creating it
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        # SLURM runs one attempt of a job at a time: an earlier attempt of this job (killed when
        # it was requeued, maybe on another node) holds nothing any more.
        job = slurm_batch_job_id()
        if job is not None and holder.get("slurm_job") == job:
            return int(holder.get("slurm_restart", 0)) < _slurm_restart_count()
        if holder.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, TypeError, ValueError):
            return False
        return False

    def _message(self, holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return (
            f"the run directory {self.path.parent} is being written by pid {holder.get('pid')} "
            f"on host {holder.get('host')} (since {since}); one writer at a time. Wait for it to "
            f"finish or stop it; if that process is gone, delete {self.path}."
        )


def keep_newer_checkpoint(run_dir: Path, ckpt_path: Path, resume_step: int, rollback: bool) -> None:
    """Refuse to roll a run back: resuming from a checkpoint older than the run's ``last.ckpt``
    would overwrite it and purge the curves after the older step. With ``rollback=true`` the
    newer one is kept as ``checkpoints/last-before-rollback-step<N>.ckpt``, and best
    checkpoints newer than the resume step as ``before-rollback-best-*.ckpt``."""
    from vae.training.checkpoints import CheckpointError, read_checkpoint

    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    if not last.is_file() or last.resolve() == ckpt_path.expanduser().resolve():
        return
    newer = int(read_checkpoint(last).get("global_step", 0))
    if newer <= resume_step:
        return
    if not rollback:
        raise CheckpointError(
            f"ckpt_path={ckpt_path} is at step {resume_step}, but the run's last.ckpt is at step "
            f"{newer}: resuming would roll the run back and purge its curves after step "
            f"{resume_step}. Resume from {last}, or add rollback=true to roll back (the newer "
            "checkpoint is then kept under another name)."
        )
    kept = last.with_name(f"last-before-rollback-step{newer:06d}.ckpt")
    os.replace(last, kept)
    # The best checkpoints of the discarded steps go aside too, so the rolled-back run keeps
    # one best-* file of its own.
    for best in last.parent.glob("best-*.ckpt"):
        if int(read_checkpoint(best).get("global_step", 0)) > resume_step:
            os.replace(best, best.with_name(f"before-rollback-{best.name}"))
    logging.getLogger(__name__).info("Rolled back from step %d; kept %s", newer, kept)


# --- DDP under a Hydra multirun -----------------------------------------------------------------
# Set by Lightning's DDP launcher (`_SubprocessScriptLauncher`) in the launching process.
DDP_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra's options that take a value: kept on a child's command line, with the value.
_HYDRA_VALUE_OPTIONS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def job_command_line(argv: list[str], job_overrides: list[str]) -> list[str]:
    """``argv`` of a multirun as the command line of one of its jobs: the program, Hydra's
    config options, then the job's own overrides (``hydra.overrides.task``); no ``-m``, no
    sweep."""
    options, rest = [], argv[1:]
    while rest:
        argument = rest.pop(0)
        if argument.startswith(_HYDRA_VALUE_OPTIONS):
            options.append(argument)
            if argument in _HYDRA_VALUE_OPTIONS and rest:  # `-cn name`, not `-cn=name`
                options.append(rest.pop(0))
    return [argv[0], *options, *job_overrides]


@contextlib.contextmanager
def ddp_children_run_this_job(trainer: Any) -> Iterator[None]:
    """Make the DDP child processes that Lightning starts for ``trainer`` run this multirun
    job, and only it.

    Lightning starts ranks > 0 by re-running ``sys.argv`` with ``hydra.run.dir=<run.dir>``
    (``_hydra_subprocess_cmd``). In a multirun (``-m``) each child would run the whole sweep
    in a sweep directory of its own: duplicate directories, and jobs paired up only by luck
    (the lightning-hydra-template's issue #393). Inside this block ``sys.argv`` is this job's
    own command line and ``hydra.run.dir`` its directory, so each child runs this one job into
    it. Afterwards the variables the launcher set (``LOCAL_RANK``, ``MASTER_PORT``, ...) are
    removed and the process group is destroyed, so that the next job starts its own children
    instead of waiting for ranks that have exited. It does nothing outside a multirun, in one
    process, and where every rank is started from outside (``srun``, submitit, ``torchrun``:
    the cluster environment creates the processes).
    """
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    environment = getattr(trainer.strategy, "cluster_environment", None)
    hydra_config = HydraConfig.get() if HydraConfig.initialized() else None
    if (
        hydra_config is None
        or hydra_config.mode != RunMode.MULTIRUN
        or trainer.world_size < 2
        or environment is None
        or environment.creates_processes_externally
    ):
        yield
        return
    argv, run_dir = list(sys.argv), hydra_config.run.dir
    sys.argv = job_command_line(argv, list(hydra_config.overrides.task))
    with read_write(hydra_config), open_dict(hydra_config):
        hydra_config.run.dir = hydra_config.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_config), open_dict(hydra_config):
            hydra_config.run.dir = run_dir
        for name in DDP_LAUNCHER_VARIABLES:
            os.environ.pop(name, None)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
