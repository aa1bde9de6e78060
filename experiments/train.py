"""`vae-train`: compose the Hydra config, build everything with ``instantiate``, fit, report.

    vae-train                                   # Gaussian VAE on the embedded digits
    vae-train experiment=vae_fashion model.beta=4
    vae-train -m model.beta=0.5,1,4             # a sweep: one run directory per job

This file only wires objects together; the maths lives in ``vae.losses`` and ``vae.nn``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

# Hydra treats a relative config_path as a module when the caller is inside a package, which
# breaks the console script; an absolute folder works from anywhere.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger(__name__)

# Names this process's resume attempt (config folder and log), fixed once per process so that
# every place that resolves it agrees.
_ATTEMPT = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"


def _group_choice(group: str, *, _root_: DictConfig) -> str:
    """The option chosen for a config group (``${choice:model}`` -> ``vae``).

    Read from the composed config's ``hydra`` node where present (this also works while a
    multirun names its sweep directory, before HydraConfig is set), else from HydraConfig.
    """
    choices = OmegaConf.select(_root_, "hydra.runtime.choices")
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    return str(choices.get(group))


# Characters that Hydra's override grammar (and shells) would need quoted in a later
# `ckpt_path=<run dir>/checkpoints/last.ckpt`, mapped to ones that need no quoting.
_PATH_SAFE = str.maketrans(
    {
        "/": "-",
        "=": "-",
        ",": "+",
        "[": None,
        "]": None,
        " ": None,
        "'": None,
        '"': None,
        "(": None,
        ")": None,
        "{": None,
        "}": None,
    }
)


def _dir_suffix(overrides: str, limit: int = 120) -> str:
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


def _resumed_run_dir(ckpt_path: str | None) -> Path | None:
    """The run a checkpoint belongs to (``<run>/checkpoints/*.ckpt``), or None: a new run."""
    if not ckpt_path:
        return None
    checkpoint = Path(ckpt_path).expanduser().resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _resume_dir(ckpt_path: str | None, new_run_dir: str) -> str:
    """Where a run writes: the checkpoint's own run directory when resuming, else a new one."""
    resumed = _resumed_run_dir(ckpt_path)
    return str(resumed) if resumed is not None else new_run_dir


def _config_subdir(ckpt_path: str | None) -> str:
    """Hydra's config folder: ``.hydra`` for a new run; a resumed run keeps the original
    ``.hydra/config.yaml`` and records its own under ``.hydra/resume_<time>``."""
    return f".hydra/resume_{_ATTEMPT}" if _resumed_run_dir(ckpt_path) else ".hydra"


def _register_resolvers() -> None:
    for name, function in (
        ("resume_dir", _resume_dir),
        ("config_subdir", _config_subdir),
        ("log_file_name", _log_file_name),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=True)
    if not OmegaConf.has_resolver("run_id"):
        # A short random id, cached so that every use within one config agrees.
        OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("choice"):
        OmegaConf.register_new_resolver("choice", _group_choice)
    if not OmegaConf.has_resolver("dir_suffix"):
        OmegaConf.register_new_resolver("dir_suffix", _dir_suffix)


def train(cfg: DictConfig, test: bool | None = None) -> dict[str, Any]:
    """Fit the configured model and return the final metrics (also written to metrics.json).

    With ``test`` (default: the config's top-level ``test`` key) the fitted model is also
    evaluated on the test split by ``vae.eval.suite.evaluate_split`` with the ``eval.*``
    settings, the same numbers ``vae-eval`` writes (the one owner of ``test/*``).
    """
    # Imports are deferred so that `--help` and config errors answer without loading torch.
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from vae.training import tags
    from vae.training.checkpoints import (
        AtomicCheckpointIO,
        check_compatible,
        read_checkpoint,
        remove_stale_temporaries,
    )
    from vae.training.config import apply_aliases, validate_config
    from vae.training.runs import write_metrics
    from vae.training.runtime import skip_failing_nvml_probe
    from vae.training.tensorboard import flatten_config, log_hparams

    skip_failing_nvml_probe()  # Lightning's import set a CUDA check that costs every step

    apply_aliases(cfg)
    validate_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with _config_errors():
        datamodule = instantiate(cfg.data, _convert_="all")
    if not getattr(datamodule, "download", False):
        # Read the data now, before any logger or checkpoint exists: a missing or damaged
        # dataset then fails with nothing written. (setup() is idempotent; Lightning's own call
        # later does nothing. With download=true, Lightning's prepare_data() comes first.)
        datamodule.setup("fit")
    with _config_errors():
        model = instantiate(
            cfg.model,
            image_shape=datamodule.image_shape,
            data_levels=datamodule.num_levels,
            _convert_="all",
        )
    model.configure_guard(**(cfg.get("trainer_guard") or {}))
    ckpt_path = cfg.get("ckpt_path")
    resume_step = None
    ckpt_steps_per_call = None
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        check_compatible(checkpoint, model, path=str(ckpt_path))
        resume_step = int(checkpoint.get("global_step", 0))
        ckpt_steps_per_call = int(checkpoint.get("steps_per_call", 1))
        del checkpoint

    loggers = [_build_logger(c, resume_step) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if OmegaConf.select(cfg, "trainer.enable_progress_bar") is False:
        # Lightning refuses a progress-bar callback when the bar is off: honour the switch.
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    steps_per_call = _steps_per_call(cfg, trainer, ckpt_path, ckpt_steps_per_call)
    model.configure_loop(steps_per_call)
    datamodule.pack_training_batches(steps_per_call)

    resumed_run = _resumed_run_dir(ckpt_path)
    if resumed_run is not None and trainer.is_global_zero:
        # This process now owns the run: a writer killed mid-save left its temporary behind.
        for stale in remove_stale_temporaries(resumed_run / "checkpoints"):
            log.info("Removed %s, a checkpoint half-written when the last attempt stopped", stale)
    if resume_step is None and trainer.is_global_zero:  # a resumed run already has its record
        resolved = OmegaConf.to_container(cfg, resolve=True)
        hparams = {
            key: value
            for key, value in flatten_config(resolved).items()
            if not key.startswith(("callbacks.", "logger.", "paths.", "eval."))
        }
        log_hparams(trainer.loggers, hparams, model.hparam_metric_tags())
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics: dict[str, Any] = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith(("val/", "train/"))
    }
    metrics.update(model.last_train_scalars)
    throughput = next((c for c in callbacks if hasattr(c, "samples_per_s")), None)
    if throughput is not None:
        metrics[tags.TRAIN_SAMPLES_PER_S] = throughput.samples_per_s
    if test if test is not None else cfg.get("test", False):
        metrics.update(_evaluate_test_split(model, datamodule, cfg.eval, trainer))
    metrics[tags.TRAIN_SKIPPED_BATCHES] = model.guard.skipped_batches
    metrics["epoch"] = trainer.current_epoch
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)
        for logger in trainer.loggers:
            logger.finalize("success")
    return metrics


def _evaluate_test_split(model, datamodule, settings: DictConfig, trainer) -> dict[str, Any]:
    """The final model's ``test/*`` numbers, exactly as ``vae-eval`` computes them (only the
    likelihood and codebook numbers; the sample scores need ``vae-eval``), written to the run's
    loggers at the final step. Every process computes them; rank 0 writes."""
    import torch

    from vae.training import tags
    from vae.eval.suite import evaluate_split
    from vae.training.tensorboard import log_histogram

    model.eval()
    images = datamodule.test_split.images[: settings.limit]
    metrics = evaluate_split(
        model,
        images,
        k=settings.k,
        batch_size=settings.batch_size,
        chunk_size=settings.chunk_size,
        seed=settings.seed,
        device=model.device,
    )
    if trainer.is_global_zero:
        scalars = {
            name: value
            for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        if tags.TEST_KL_PER_DIM in metrics:
            values = torch.tensor(metrics[tags.TEST_KL_PER_DIM])
            log_histogram(trainer.loggers, tags.TEST_KL_PER_DIM, values, trainer.global_step)
    return metrics


def _steps_per_call(cfg: DictConfig, trainer, ckpt_path, ckpt_steps_per_call: int | None) -> int:
    """``train_loop.steps_per_call``, or 1 where the trainer needs one step per batch; a resumed
    run must keep the checkpoint's kind of loop (Lightning counts global_step separately for
    automatic and manual optimisation)."""
    from vae.training.config import ConfigError
    from vae.models.base import batch_counting_settings

    requested = int(OmegaConf.select(cfg, "train_loop.steps_per_call", default=1) or 1)
    steps = requested
    reasons = batch_counting_settings(trainer) if requested > 1 else []
    if reasons:
        steps = 1
        log.info(
            "train_loop.steps_per_call=%d -> 1 (one optimizer step per batch) because of %s",
            requested,
            ", ".join(reasons),
        )
    if ckpt_steps_per_call is not None and (ckpt_steps_per_call > 1) != (steps > 1):
        why = f" (it falls back to 1 because of {', '.join(reasons)})" if reasons else ""
        raise ConfigError(
            f"ckpt_path={ckpt_path} was trained with train_loop.steps_per_call="
            f"{ckpt_steps_per_call}, and this run would use {steps}{why}. Lightning counts "
            "global_step separately for one and for several steps per call, so resume with "
            f"train_loop.steps_per_call={ckpt_steps_per_call} and the overrides of the original run."
        )
    return steps


@contextlib.contextmanager
def _config_errors():
    """A ValueError raised while building an object from config (it names the key, e.g.
    ``model.hidden_dims``) becomes a ConfigError: a one-line message, not a traceback."""
    from hydra.errors import InstantiationException

    from vae.training.config import ConfigError

    try:
        yield
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ValueError) and not isinstance(cause, ConfigError):
            raise ConfigError(str(cause)) from None
        raise


def _build_logger(logger_cfg: DictConfig, resume_step: int | None):
    """Instantiate one logger. A resumed TensorBoard run hides the events written after the
    checkpoint (steps > its global step), so curves have no duplicated steps."""
    from hydra.utils import instantiate

    if resume_step is not None and str(logger_cfg.get("_target_", "")).endswith(
        "TensorBoardLogger"
    ):
        return instantiate(logger_cfg, purge_step=resume_step + 1)
    return instantiate(logger_cfg)


def _log_file_name(ckpt_path: str | None) -> str:
    """The job log: ``train.log``; a resume logs to its own file and leaves the first alone."""
    return f"train_resume_{_ATTEMPT}.log" if _resumed_run_dir(ckpt_path) else "train.log"


def _discard_unused_outputs(run_dir: Path) -> None:
    """Undo what Hydra wrote for a run that failed before it started.

    A new run directory holding nothing but Hydra's own files is removed whole. Resuming into
    an existing run only removes this attempt's own config folder and log, so the run's
    checkpoints, events, metrics and first config stay exactly as they were.
    """
    from hydra.core.hydra_config import HydraConfig

    if not run_dir.is_dir():
        return
    hydra_cfg = HydraConfig.get()
    subdir = hydra_cfg.output_subdir
    if subdir and subdir != ".hydra":  # a resume attempt
        shutil.rmtree(run_dir / subdir, ignore_errors=True)
        log_file = OmegaConf.select(hydra_cfg, "job_logging.handlers.file.filename")
        if log_file:
            logging.shutdown()
            Path(log_file).unlink(missing_ok=True)
        return
    produced = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not produced:
        shutil.rmtree(run_dir, ignore_errors=True)


_register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from vae.training.checkpoints import CheckpointError
    from vae.training.config import ConfigError
    from vae.data import DatasetNotFoundError
    from vae.models import NonFiniteLossError

    run_dir = Path(cfg.paths.output_dir)
    try:
        metrics = train(cfg)
    except NonFiniteLossError as err:
        print(f"vae-train: error: {err}\nRun directory: {run_dir}", file=sys.stderr)
        sys.exit(3)
    except (ConfigError, DatasetNotFoundError, CheckpointError) as err:
        _discard_unused_outputs(run_dir)
        print(f"vae-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # DDP workers run this too; one report is enough
        print("View the runs with: tensorboard --logdir " + str(cfg.paths.log_dir))
        print(run_dir)
    return metrics.get("val/loss")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
