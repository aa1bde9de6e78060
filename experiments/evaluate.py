"""`vae-eval ckpt_path=PATH`: test-split numbers of a trained run, written back into that run.

    vae-eval ckpt_path=logs/vae_digits/<run>/checkpoints/last.ckpt
    vae-eval ckpt_path=logs/vae_fashion/<run> eval.k=1000 eval.limit=2000

The model and the data are rebuilt from the run's own ``.hydra/config.yaml`` (the run directory
is the parent of ``checkpoints/``), the weights come from the checkpoint, and the ``test/*``
scalars (tags in ``vae.training.tags``) are added to the run's TensorBoard at the checkpoint's
``global_step`` (replacing an earlier evaluation at that step) and merged into its
``metrics.json``. A missing or unreadable checkpoint or run config, or a run that another
process is writing (its writer lock), ends with one error line and exit code 2, before anything
is written.

Started by ``torchrun --nproc_per_node=W --no-python vae-eval ...`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), the W processes share a VAE's
importance sampling (``vae.eval.suite``: the same numbers as one process, up to the order of
float64 sums); rank 0 holds the run's lock, writes and prints.

This file only wires; the metrics are plain functions in ``vae.eval``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.train import CONFIG_DIR, build_model

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = Path(".hydra") / "config.yaml"


class EvaluationError(ValueError):
    """vae-eval cannot run as asked; the message says what to change."""


# --- settings -------------------------------------------------------------------------------
def check_eval_settings(settings: DictConfig) -> None:
    """Raise ``EvaluationError`` naming every invalid ``eval.*`` value."""
    from vae.training.config import non_negative_int, optional, positive_int

    rules = (
        ("k", positive_int, "a positive integer, e.g. eval.k=5000"),
        ("limit", optional(positive_int), "null or a positive integer"),
        ("batch_size", positive_int, "a positive integer"),
        ("chunk_size", optional(positive_int), "null or a positive integer"),
        ("seed", non_negative_int, "an integer >= 0"),
        ("num_samples", positive_int, "a positive integer"),
        ("sample_scores", lambda v: isinstance(v, bool), "true or false"),
    )
    problems = [
        f"eval.{key}={settings.get(key)!r} is invalid: expected {expected}."
        for key, check, expected in rules
        if not check(settings.get(key))
    ]
    if problems:
        raise EvaluationError("\n  ".join(["invalid settings:", *problems]))


def start_process_group() -> tuple[int, int]:
    """(rank, world size): joins the ``torch.distributed`` group that torchrun's variables
    describe (gloo, or nccl when CUDA is available), or (0, 1) when started alone."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_ranks_agree(ok: bool, world_size: int) -> bool:
    """Whether ``ok`` holds on every process (True alone): rank 0's lock decides for all."""
    if world_size == 1:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resolve_device(name: str):
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvaluationError(
            f"eval.device={name!r} is not a device; use auto, cpu or cuda."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(
            f"eval.device={name} but no CUDA device is available; use eval.device=cpu."
        )
    return device


# --- the run --------------------------------------------------------------------------------
def locate_run(ckpt_path: str | None) -> tuple[Path, Path]:
    """(checkpoint file, run directory) from ``ckpt_path`` (a checkpoint or a run directory)."""
    if not ckpt_path:
        raise EvaluationError(
            "ckpt_path is required: vae-eval ckpt_path=logs/<name>/<run>/checkpoints/last.ckpt"
        )
    path = Path(str(ckpt_path)).expanduser().resolve()
    if not path.exists():
        raise EvaluationError(
            f"ckpt_path={ckpt_path} does not exist: give a checkpoint file "
            "(<run>/checkpoints/last.ckpt or best-*.ckpt) or a run directory."
        )
    if path.is_dir():
        path = (
            path / CHECKPOINT_DIR / "last.ckpt"
            if path.name != CHECKPOINT_DIR
            else path / "last.ckpt"
        )
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    return path, run_dir


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's saved config, with ``paths.output_dir`` pointing at the run directory.

    The saved file keeps Hydra's ``${hydra:runtime.output_dir}``, which only means something
    inside the original run; here it is replaced by the run directory itself.
    """
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise EvaluationError(
            f"no run config at {path}: vae-eval rebuilds the model and data from the config that "
            "vae-train saved next to the checkpoints/ folder. Pass a checkpoint inside its run "
            "directory (<run>/checkpoints/*.ckpt)."
        )
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:
        raise EvaluationError(f"the run config {path} cannot be read: {err}") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "data" not in cfg:
        raise EvaluationError(f"the run config {path} has no model/data sections.")
    if "paths" in cfg:
        cfg.paths.output_dir = str(run_dir)
    return cfg


def build_model_and_data(run_cfg: DictConfig, checkpoint: dict, ckpt: Path, data_root: str | None):
    """Instantiate the run's DataModule and model and load the checkpoint's weights."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from vae.data import DatasetNotFoundError
    from vae.training.checkpoints import CheckpointError, check_compatible

    if data_root is not None:
        run_cfg.data.root = data_root
    # A text model's checkpoint holds its vocabulary: the test ids must be those it learned.
    vocabulary = checkpoint.get("hyper_parameters", {}).get("vocabulary")
    saved = ckpt.parent.parent / "vocab.json"
    if vocabulary is not None and saved.is_file() and json.loads(saved.read_text()) != vocabulary:
        raise EvaluationError(
            f"{saved} is not the vocabulary of {ckpt} (a file from another run?): the "
            "checkpoint's own vocabulary is used for evaluation; restore or remove that file."
        )
    data_args = {} if vocabulary is None else {"vocabulary": vocabulary}
    try:
        datamodule = instantiate(run_cfg.data, **data_args, _convert_="all")
        check_same_depth(checkpoint, datamodule, ckpt)
        model = build_model(run_cfg.model, datamodule)
        check_compatible(checkpoint, model, path=str(ckpt))
        model.load_state_dict(checkpoint["state_dict"])
        datamodule.setup("test")
    except (CheckpointError, DatasetNotFoundError) as err:
        raise EvaluationError(str(err)) from None
    except (InstantiationException, ValueError) as err:
        raise EvaluationError(f"the run's config does not build here: {err}") from None
    return model.eval(), datamodule


def check_same_depth(checkpoint: dict, datamodule, ckpt: Path) -> None:
    """One line if the checkpoint's model was trained on pixels of another depth (its saved
    ``data_levels``) than the data the run config now gives: its likelihood (a discretised one
    has a bin per level) would score data it was not made for."""
    saved = checkpoint.get("hyper_parameters", {}).get("data_levels")
    levels = getattr(datamodule, "num_levels", None)
    if saved is not None and levels is not None and saved != levels:
        raise EvaluationError(
            f"ckpt_path={ckpt}: the model was trained on pixels of {saved} levels, but the run's "
            f"data config gives {levels} (data.binarize={getattr(datamodule, 'binarize', '?')}); "
            "restore the run's data settings in its .hydra/config.yaml."
        )


# --- metrics --------------------------------------------------------------------------------
def _progress(label: str, total: int):
    start = time.perf_counter()
    shown = [0]

    def report(done: int) -> None:
        if done == total or done - shown[0] >= max(1, total // 10):
            shown[0] = done
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"  {label}: {done}/{total} examples ({rate:.1f}/s)", file=sys.stderr, flush=True)

    return report


def sample_metrics(model, run_cfg: DictConfig, settings: DictConfig, limit: int | None, device):
    """Label KL, classifier score (and FID where possible); a note instead when not possible."""
    import torch
    from hydra.utils import instantiate

    from vae.eval.sample_scores import (
        ClassifierSettings,
        fid_unavailable_reason,
        frechet_inception_distance,
        load_or_train_classifier,
    )
    from vae.eval.suite import sample_score_metrics

    notes: list[str] = []
    torch.manual_seed(settings.seed)
    try:
        samples = model.sample(settings.num_samples)
    except NotImplementedError:
        samples = None
    if samples is None:
        return {}, [f"sample scores skipped: {type(model).__name__} cannot sample (no prior)."]
    # The classifier sees grey-level images, the same kind as the samples (decoder means).
    grey = instantiate(run_cfg.data, binarize="none", _convert_="all")
    grey.setup("fit")
    settings_c = ClassifierSettings(**OmegaConf.to_container(settings.classifier))
    cache_dir = settings.cache_dir or OmegaConf.select(run_cfg, "paths.cache_dir") or ".cache"
    classifier, path, trained = load_or_train_classifier(
        cache_dir,
        getattr(grey, "name", type(grey).__name__),
        grey.train_split.images.to(device),
        grey.train_split.labels.to(device),
        grey.num_classes,
        settings_c,
    )
    notes.append(
        f"sample classifier {'trained and cached at' if trained else 'loaded from'} {path}"
    )
    real_images = grey.test_split.images[:limit].to(device)
    real_labels = grey.test_split.labels[:limit].to(device)
    metrics = sample_score_metrics(samples, classifier, real_images, real_labels)
    reason = fid_unavailable_reason()
    if reason is None:
        from vae.training import tags

        metrics[tags.TEST_FID] = frechet_inception_distance(samples, real_images)
        notes.append(
            f"FID: {samples.shape[0]} samples against {real_images.shape[0]} test images, "
            "Inception-v3 pool features (torchmetrics)."
        )
    else:
        notes.append(reason)
    return metrics, notes


def check_finite_metrics(metrics: dict[str, Any]) -> None:
    """Refuse to write NaN, or an infinity where none is a valid value, into the run's records
    (``vae.eval.suite.non_finite_metrics``)."""
    from vae.eval.suite import non_finite_metrics

    bad = non_finite_metrics(metrics)
    if bad:
        raise EvaluationError(
            f"the model gives non-finite test numbers ({', '.join(bad[:4])}); nothing was "
            "written to the run. Its weights may have diverged: evaluate an earlier checkpoint."
        )


def write_back(run_dir: Path, metrics: dict[str, Any], step: int) -> None:
    """Scalars and the KL-per-dimension histogram into the run's TensorBoard, replacing an
    earlier evaluation at ``step``; merged into metrics.json."""
    from vae.training.runs import write_metrics
    from vae.training.tensorboard import write_test_events

    write_test_events(run_dir, metrics, step)
    write_metrics(run_dir, metrics)


def evaluate(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Evaluate ``cfg.ckpt_path`` as configured by ``cfg.eval``; return (run dir, metrics).

    The run's writer lock (``vae.training.runs.RunLock``) is held from before the checkpoint
    is read until the numbers are written: while another process writes the run (vae-train,
    another vae-eval), this is refused before anything is computed or written.
    """
    from vae.training.config import positive_int
    from vae.training.runs import RunLock, RunLockedError
    from vae.training.threads import apply_threads

    settings = cfg.eval
    check_eval_settings(settings)
    threads = cfg.get("threads", "auto")
    if threads != "auto" and not positive_int(threads):
        raise EvaluationError(
            f"threads={threads!r} is invalid: expected auto or a positive integer."
        )
    ckpt, run_dir = locate_run(cfg.get("ckpt_path"))
    run_cfg = load_run_config(run_dir)
    rank, world_size = start_process_group()
    lock, refused = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as err:
            refused = err
    if not all_ranks_agree(refused is None, world_size):
        raise EvaluationError(str(refused or f"rank 0 could not take the lock of {run_dir}"))
    threads_note = apply_threads(threads)
    try:
        return run_dir, evaluate_checkpoint(ckpt, run_dir, run_cfg, settings, threads_note, rank)
    finally:
        if lock is not None:
            lock.release()


def evaluate_checkpoint(
    ckpt: Path,
    run_dir: Path,
    run_cfg: DictConfig,
    settings: DictConfig,
    threads_note: str = "",
    rank: int = 0,
) -> dict[str, Any]:
    """The test/* numbers of ``ckpt``, written into ``run_dir`` at the checkpoint's step.
    ``threads_note`` (the thread choice) is printed once the checkpoint is known to be good.
    Of several processes (``rank`` > 0), only rank 0 prints, scores samples and writes."""
    from vae.eval.suite import evaluate_split, evaluation_inputs
    from vae.training.checkpoints import CheckpointError, read_checkpoint

    try:
        checkpoint = read_checkpoint(ckpt)
    except CheckpointError as err:
        raise EvaluationError(str(err)) from None
    step = int(checkpoint.get("global_step", 0))
    device = resolve_device(str(settings.device))
    model, datamodule = build_model_and_data(run_cfg, checkpoint, ckpt, settings.data_root)
    del checkpoint
    model.to(device)
    if threads_note and rank == 0:
        print(f"vae-eval: {threads_note}", file=sys.stderr)

    limit = settings.limit
    images = evaluation_inputs(datamodule)[:limit]
    if rank == 0:
        print(
            f"vae-eval: {type(model).__name__} at step {step}, {images.shape[0]} test examples "
            f"of {getattr(datamodule, 'name', type(datamodule).__name__)}, device {device}",
            file=sys.stderr,
        )
    started = time.perf_counter()
    try:
        metrics = evaluate_split(
            model,
            images,
            k=settings.k,
            batch_size=settings.batch_size,
            chunk_size=settings.chunk_size,
            seed=settings.seed,
            device=device,
            progress=_progress,
        )
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if rank > 0:
        return metrics
    notes: list[str] = []
    if settings.sample_scores and getattr(model, "modality", "image") == "text":
        notes.append("vae-eval: no sample scores for text (they score images with a classifier)")
    elif settings.sample_scores:
        scores, notes = sample_metrics(model, run_cfg, settings, limit, device)
        metrics.update(scores)
    print(f"vae-eval: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    check_finite_metrics(metrics)
    write_back(run_dir, metrics, step)
    for note in notes:
        print(note)
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = []
    for name, value in metrics.items():
        if isinstance(value, float):
            lines.append(f"{name:32s} {value:.4f}")
        elif isinstance(value, list):
            lines.append(f"{name:32s} [{', '.join(f'{v:.3f}' for v in value)}]")
        else:
            lines.append(f"{name:32s} {value}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    from vae.training.library_noise import silence_library_noise

    silence_library_noise()
    try:
        run_dir, metrics = evaluate(cfg)
    except EvaluationError as err:
        print(f"vae-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
    import torch.distributed as dist

    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank > 0:
            return
    print(format_metrics(metrics))
    print(f"Written to {run_dir / 'metrics.json'} and its TensorBoard run. Run directory:")
    print(run_dir)


def main() -> None:
    _hydra_main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Started by torchrun, and done. torch's Gloo worker threads can still hold their last
        # collective's tensors while Python finalises; the thread then takes the GIL of a dying
        # interpreter and the process aborts (SIGABRT, "terminate called without an active
        # exception") after a successful evaluation, about 1 run in 30 under load. Leave
        # without finalising: the results are written and the streams flushed here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
