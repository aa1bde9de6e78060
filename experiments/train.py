"""`vae-train`: compose the Hydra config, build everything with ``instantiate``, fit, report.

    vae-train                                   # Gaussian VAE on the embedded digits
    vae-train experiment=vae_fashion model.beta=4
    vae-train -m model.beta=0.5,1,4             # a sweep: one run directory per job

This file only wires objects together: the maths lives in ``vae.losses`` and ``vae.nn``, the
training step in ``vae.models``, and run directories in ``vae.training.runs``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from vae.training.runs import register_resolvers

# Hydra treats a relative config_path as a module when the caller is inside a package, which
# breaks the console script; an absolute folder works from anywhere.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# model.* keys that say how vae-train runs the networks (LatentVariableModule.compile_networks,
# .use_channels_last), not what the model is: not model arguments, not in its checkpoint.
RUN_OPTIONS = ("compile", "channels_last")

log = logging.getLogger(__name__)


def train(cfg: DictConfig, test: bool | None = None) -> dict[str, Any]:
    """Fit the configured model and return the final metrics (also written to metrics.json).

    With ``test`` (default: the config's top-level ``test`` key) the fitted model is also
    evaluated on the test split by ``vae.eval.suite.evaluate_split`` with the ``eval.*``
    settings, the same numbers ``vae-eval`` writes (the one owner of ``test/*``).

    The run directory has one writer at a time: this process holds its lock
    (``vae.training.runs.RunLock``) from start to end; a second writer is refused.
    """
    from vae.training.config import apply_aliases, validate_config

    apply_aliases(cfg)
    validate_config(cfg)  # before torch and Lightning load (~6 s): a bad config answers at once
    return _fit(cfg, test)


def _fit(cfg: DictConfig, test: bool | None = None) -> dict[str, Any]:
    """``train`` of a validated config: holds the run's lock around ``_train``."""
    from lightning.pytorch.utilities import rank_zero_only

    from vae.training.runs import RunLock

    # Rank 0 only: under DDP the other processes write into the same run through rank 0.
    lock = RunLock(cfg.paths.output_dir).acquire() if rank_zero_only.rank == 0 else None
    try:
        return _train(cfg, test)
    finally:
        if lock is not None:
            lock.release()


def build_model(model_cfg: DictConfig, datamodule):
    """The model of ``model_cfg`` for ``datamodule``: its images' shape and pixel levels, or
    its vocabulary for a text model.

    The parts stay configs (``_recursive_=False``): the model builds them and saves them with
    its hyper-parameters, so that ``Model.load_from_checkpoint(path)`` rebuilds it alone.
    """
    from hydra.utils import get_class, instantiate

    from vae.training.config import ConfigError

    # Text models take the DataModule's vocabulary, image models its image shape: a model of
    # one kind on data of the other is refused before anything is written.
    model_kind = getattr(get_class(model_cfg._target_), "modality", "image")
    data_kind = getattr(datamodule, "modality", "image")
    if model_kind != data_kind:
        raise ConfigError(
            f"model ({model_cfg._target_}) needs {model_kind} data, but data={datamodule.name} "
            f"is {data_kind} data: use model=text_lm or text_vae with data=fortunes, or an image "
            "model (e.g. model=vae) with an image dataset (e.g. data=digits)."
        )
    data_args = (
        {"vocabulary": datamodule.vocabulary.tokens}
        if data_kind == "text"
        else {"image_shape": datamodule.image_shape, "data_levels": datamodule.num_levels}
    )
    config = OmegaConf.to_container(model_cfg, resolve=True)
    for option in RUN_OPTIONS:  # how to run the networks, not part of the model: see _train
        config.pop(option, None)
    return instantiate(config, **data_args, _recursive_=False, _convert_="all")


def _train(cfg: DictConfig, test: bool | None) -> dict[str, Any]:
    # Imports are deferred so that `--help` and config errors answer without loading torch.
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from vae.training import tags
    from vae.training.callbacks import RunInterrupted, SlurmRequeue
    from vae.training.checkpoints import (
        AtomicCheckpointIO,
        check_compatible,
        check_same_data,
        read_checkpoint,
        remove_stale_temporaries,
    )
    from vae.training.config import config_errors
    from vae.training.runs import (
        config_subdir,
        ddp_children_run_this_job,
        keep_newer_checkpoint,
        record_latest_config,
        requeued_checkpoint,
        resumed_run_dir,
        write_metrics,
    )
    from vae.training.tensorboard import config_hparams, log_hparams, task_overrides, trial_name
    from vae.training.threads import apply_threads

    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with config_errors(cfg):
        datamodule = instantiate(cfg.data, _convert_="all")
        # Read the data now, before any logger or checkpoint exists: a missing or damaged
        # dataset then fails with nothing written (Lightning's own setup() call does nothing).
        if not getattr(datamodule, "download", False):
            datamodule.setup("fit")
        model = build_model(cfg.model, datamodule)
        if cfg.model.get("channels_last", False):
            model.use_channels_last()  # before compiling: the compiled graph sees the layout
        if cfg.model.get("compile", False):
            model.compile_networks()
    # A requeued SLURM job computes its first attempt's run directory (its name holds the job
    # id) and continues from that run's last.ckpt.
    ckpt_path = cfg.get("ckpt_path") or requeued_checkpoint(run_dir)
    resume_step = None
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        check_same_data(checkpoint, datamodule, path=str(ckpt_path))
        check_compatible(checkpoint, model, path=str(ckpt_path))
        resume_step = int(checkpoint.get("global_step", 0))
        del checkpoint

    # A resumed TensorBoard run hides the events written after its checkpoint, so that the
    # curves have no duplicated steps. Loggers write nothing until first used.
    purge = {} if resume_step is None else {"purge_step": resume_step + 1}
    with config_errors(cfg):
        # A group entry set to null (`callbacks.progress_bar=null`) is switched off.
        loggers = [instantiate(c, **purge) for c in (cfg.get("logger") or {}).values() if c]
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        callbacks.append(SlurmRequeue())  # does nothing outside a SLURM job
        if OmegaConf.select(cfg, "trainer.enable_progress_bar") is False:
            # Lightning refuses a progress-bar callback when the bar is off: honour the switch.
            callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
        trainer = instantiate(
            cfg.trainer,
            logger=loggers or False,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
        )
    # torch's threads per op, for this machine's load and the sweep's parallel jobs (train.log).
    threads = apply_threads(cfg.get("threads", "auto"), processes=trainer.num_devices)
    if trainer.is_global_zero:
        log.info(threads)

    resumed = resumed_run_dir(ckpt_path)
    if resumed is not None and trainer.is_global_zero:
        # This process now owns the run: a writer killed mid-save left its temporary behind.
        for stale in remove_stale_temporaries(resumed / "checkpoints"):
            log.info("Removed %s, a checkpoint half-written when the last attempt stopped", stale)
        keep_newer_checkpoint(resumed, Path(ckpt_path), resume_step, bool(cfg.get("rollback")))
        attempt = config_subdir(ckpt_path)
        if (resumed / attempt / "config.yaml").is_file():  # written by Hydra (the CLI)
            changes = record_latest_config(resumed, attempt)
            log.info(
                "Resumed from step %d; config changes: %s",
                resume_step,
                "; ".join(changes) if changes else "none",
            )
    if resume_step is None and trainer.is_global_zero:  # a resumed run already has its record
        trial = trial_name(task_overrides(), run_dir, default=str(cfg.get("name") or "run"))
        log_hparams(trainer.loggers, config_hparams(cfg), trial)
    try:
        with ddp_children_run_this_job(trainer):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's own, a SystemExit without a code: not a success
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise RunInterrupted("stopped by SIGTERM before any checkpoint was written") from None
        raise RunInterrupted(
            f"stopped by SIGTERM; checkpoints/last.ckpt holds step "
            f"{read_checkpoint(last)['global_step']}. Resume with: vae-train ckpt_path={run_dir}"
        ) from None

    metrics: dict[str, Any] = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith(("val/", "train/"))
    }
    for callback in callbacks:
        if hasattr(callback, "samples_per_s"):
            metrics[tags.TRAIN_SAMPLES_PER_S] = callback.samples_per_s
        if hasattr(callback, "skipped_batches"):
            metrics[tags.TRAIN_SKIPPED_BATCHES] = callback.skipped_batches
    metrics["epoch"] = trainer.current_epoch
    metrics["global_step"] = trainer.global_step
    if trainer.fast_dev_run:  # debug=fdr: one batch, no events, no checkpoints; not a result
        metrics["fast_dev_run"] = True
    if test if test is not None else cfg.get("test", False):
        # The final model's test/* numbers, exactly as vae-eval computes them (the sample scores
        # need vae-eval), at the final step, in the run's event file of test numbers at that
        # step: a later vae-eval of last.ckpt replaces them rather than adding a second point.
        from vae.eval.suite import evaluate_split, evaluation_inputs, non_finite_metrics
        from vae.training.callbacks import NonFiniteLossError
        from vae.training.tensorboard import write_test_events

        settings = cfg.eval
        test_metrics = evaluate_split(
            model.eval(),
            evaluation_inputs(datamodule)[: settings.limit],
            k=settings.k,
            batch_size=settings.batch_size,
            chunk_size=settings.chunk_size,
            seed=settings.seed,
            device=model.device,
        )
        bad = non_finite_metrics(test_metrics)
        if bad:
            if trainer.is_global_zero:  # the fit's own record is sound: keep it
                write_metrics(run_dir, metrics)
            raise NonFiniteLossError(
                f"the trained model gives non-finite test numbers ({', '.join(bad[:4])}); no "
                "test/* was written to the run. Its checkpoints are kept: evaluate one with "
                f"vae-eval ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} (or a best-*.ckpt)."
            )
        if trainer.is_global_zero:
            write_test_events(run_dir, test_metrics, trainer.global_step)
        metrics.update(test_metrics)
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)
        for logger in trainer.loggers:
            logger.finalize("success")
    return metrics


register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from vae.training.config import ConfigError, apply_aliases, validate_config

    run_dir = Path(cfg.paths.output_dir)
    try:  # train()'s check, here before the imports below load torch and Lightning (~6 s)
        apply_aliases(cfg)
        validate_config(cfg)
    except ConfigError as err:
        _refuse(err, cfg)

    from vae.data import DatasetNotFoundError
    from vae.training.callbacks import NonFiniteLossError, RunInterrupted
    from vae.training.checkpoints import CheckpointError, DiskFullError
    from vae.training.library_noise import silence_library_noise
    from vae.training.runs import RunLockedError

    silence_library_noise()
    try:
        metrics = _fit(cfg)
    except NonFiniteLossError as err:
        print(f"vae-train: error: {err}\nRun directory: {run_dir}", file=sys.stderr)
        sys.exit(3)
    except RunInterrupted as err:
        print(f"vae-train: {err}", file=sys.stderr)
        sys.exit(143)  # what a death by SIGTERM reports: a chain `vae-train && ...` stops
    except DiskFullError as err:
        print(
            f"vae-train: error: {err.strerror}. Free some space, then resume with: "
            f"vae-train ckpt_path={run_dir}",
            file=sys.stderr,
        )
        sys.exit(1)
    except (ConfigError, DatasetNotFoundError, CheckpointError, RunLockedError) as err:
        _refuse(err, cfg)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # DDP workers run this too; one report is enough
        print("View the runs with: tensorboard --logdir " + str(cfg.paths.log_dir))
        print(run_dir)
    return metrics.get("val/elbo")


def _refuse(err: Exception, cfg: DictConfig) -> NoReturn:
    """Exit 2 with the one-line reason, removing what Hydra created for this refused run."""
    from hydra.core.hydra_config import HydraConfig

    from vae.training.runs import discard_unused_outputs

    hydra_cfg = HydraConfig.get()
    log_file = OmegaConf.select(hydra_cfg, "job_logging.handlers.file.filename")
    discard_unused_outputs(
        Path(cfg.paths.output_dir),
        hydra_cfg.output_subdir,
        log_file,
        log_dir=Path(cfg.paths.log_dir),
    )
    print(f"vae-train: error: {err}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """The console script. Before Hydra parses the command line, a resume
    (``ckpt_path=<run or checkpoint>``) is completed with the run's recorded overrides, and old
    spellings of moved keys are rewritten."""
    from vae.training.config import ConfigError, rewrite_moved_keys
    from vae.training.runs import with_recorded_overrides

    try:
        sys.argv[1:] = rewrite_moved_keys(with_recorded_overrides(sys.argv[1:]))
    except ConfigError as err:
        print(f"vae-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
