"""Writing to TensorBoard beyond scalars: images, histograms, the HParams tab, test numbers.

Lightning's loggers handle scalars. Images and histograms need the underlying
``SummaryWriter``; these helpers find it for every TensorBoard logger attached to a trainer,
so that the rest of the code never touches logger internals. The ``test/*`` numbers go into an
event file of their own per evaluated step (:func:`write_test_events`), so that evaluating a
checkpoint again replaces them instead of adding a second point.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid


def summary_writers(loggers: Iterable[Any]) -> Iterator[Any]:
    """Yield the ``SummaryWriter`` of every TensorBoard logger in ``loggers``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """A (C, H', W') grid in [0, 1] from a (N, C, H, W) batch, via ``torchvision.utils.make_grid``."""
    images = images.detach().float().clamp(0.0, 1.0).cpu()
    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    return make_grid(images, nrow=nrow, padding=1, pad_value=1.0)


def log_image_grid(loggers: Iterable[Any], tag: str, images: torch.Tensor, step: int, nrow=None):
    grid = image_grid(images, nrow=nrow)
    for writer in summary_writers(loggers):
        writer.add_image(tag, grid, global_step=step)


def log_histogram(loggers: Iterable[Any], tag: str, values: torch.Tensor, step: int) -> None:
    values = values.detach().float().cpu()
    for writer in summary_writers(loggers):
        writer.add_histogram(tag, values, global_step=step)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"beta": 4}}`` -> ``{"model.beta": 4}``; lists become strings.

    The HParams plugin accepts only int, float, str and bool values.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def log_hparams(
    loggers: Iterable[Any], params: Mapping[str, Any], metric_tags: Iterable[str]
) -> None:
    """Register the run's hyper-parameters and the metric tags the HParams tab should show.

    The tab reads each metric's *latest* value from the scalar series of the same tag in the
    same run, so this is written once at the start and still shows the final metrics (also for a
    run that crashed half-way). Writing values here would add a spurious point to the curves.
    """
    experiment, session_start, session_end = hparams_summary(
        dict(params), {tag: 0.0 for tag in metric_tags}
    )
    for writer in summary_writers(loggers):
        file_writer = writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary)


TEST_EVENTS_SUFFIX = ".test-step"


def write_test_events(run_dir: str | os.PathLike, metrics: Mapping[str, Any], step: int) -> None:
    """Write the ``test/*`` numbers of one evaluation (``vae.eval.suite.evaluate_split``) into
    the run as an event file of their own, replacing any earlier evaluation at the same step.

    The scalars, and ``test/kl_per_dim`` as a histogram, go into
    ``<run_dir>/events.out.tfevents.*.test-step<step>``: TensorBoard reads every file with
    "tfevents" in its name as part of the run. Once that file is complete, the earlier files of
    the same step are deleted, so each tag has one point at ``step`` however often a checkpoint
    is evaluated (``vae-train test=true``, then ``vae-eval``, or ``vae-eval`` twice); other
    steps' files and the training event files stay. (``purge_step`` cannot do this: it would also
    hide the training curves at ``step``.) The caller holds the run's writer lock.
    """
    from torch.utils.tensorboard import SummaryWriter

    from vae.training import tags

    run_dir = Path(run_dir)
    suffix = f"{TEST_EVENTS_SUFFIX}{step}"
    pattern = f"events.out.tfevents.*{suffix}"  # end-anchored: step 10 is not step 100
    earlier = set(run_dir.glob(pattern))
    writer = SummaryWriter(log_dir=str(run_dir), filename_suffix=suffix)
    try:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(name, value, global_step=step)
        if tags.TEST_KL_PER_DIM in metrics:
            values = torch.tensor(metrics[tags.TEST_KL_PER_DIM])
            writer.add_histogram(tags.TEST_KL_PER_DIM, values, global_step=step)
    finally:
        writer.close()  # flushes: the new file is complete before the old ones go
    for old in earlier:
        old.unlink(missing_ok=True)
