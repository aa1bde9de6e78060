"""Writing to TensorBoard beyond scalars: images, charts, histograms, the HParams tab, test numbers.

Lightning's loggers handle scalars. Images and histograms need the underlying
``SummaryWriter``; these helpers find it for every TensorBoard logger attached to a trainer,
so that the rest of the code never touches logger internals. The ``test/*`` numbers go into an
event file of their own per evaluated step (:func:`write_test_events`), so that evaluating a
checkpoint again replaces them instead of adding a second point.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from torchvision.utils import make_grid

MIN_GRID_WIDTH = 256  # pixels: smaller grids are enlarged by an integer factor (nearest)


def summary_writers(loggers: Iterable[Any]) -> Iterator[Any]:
    """Yield the ``SummaryWriter`` of every TensorBoard logger in ``loggers``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment


def image_grid(
    images: torch.Tensor, nrow: int | None = None, min_width: int = MIN_GRID_WIDTH
) -> torch.Tensor:
    """A (C, H', W') grid in [0, 1] from a (N, C, H, W) batch, via ``torchvision.utils.make_grid``.

    A grid narrower than ``min_width`` pixels is enlarged by the smallest integer factor that
    reaches it, each pixel becoming a factor x factor block (nearest neighbour): eight 8x8
    digits per row (73 pixels) become 4x larger, and stay sharp where a browser would blur them.
    """
    images = images.detach().float().clamp(0.0, 1.0).cpu()
    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=1.0)
    factor = max(1, math.ceil(min_width / grid.shape[-1]))
    return grid.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def log_image_grid(loggers: Iterable[Any], tag: str, images: torch.Tensor, step: int, nrow=None):
    log_image(loggers, tag, image_grid(images, nrow=nrow), step)


def log_image(loggers: Iterable[Any], tag: str, image: torch.Tensor, step: int) -> None:
    """One (C, H, W) image in [0, 1] under ``tag`` at ``step``."""
    for writer in summary_writers(loggers):
        writer.add_image(tag, image, global_step=step)


def log_histogram(loggers: Iterable[Any], tag: str, values: torch.Tensor, step: int) -> None:
    values = values.detach().float().cpu()
    for writer in summary_writers(loggers):
        writer.add_histogram(tag, values, global_step=step)


BAR_COLOUR = (0.12, 0.47, 0.71)  # matplotlib's default blue, "C0"


def bar_chart(
    heights: Sequence[float] | torch.Tensor,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_scale: bool = False,
) -> torch.Tensor:
    """A (3, 260, 400) RGB image in [0, 1]: one bar per value, left to right in the given order,
    with labelled axes (matplotlib, drawn off-screen: no display and no pyplot state).

    ``log_scale`` puts the y axis on a log scale; a zero then has no bar.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = torch.as_tensor(heights).detach().double().cpu().numpy()
    # "constrained": margins fit the labels (long tick labels such as 0.0008 included);
    # drawing takes ~0.05 s (8 bars) to ~0.1 s (512 codes).
    figure = Figure(figsize=(4.0, 2.6), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if len(heights) <= 64:
        axes.bar(np.arange(len(heights)), heights, width=0.8, color=BAR_COLOUR)
    else:  # one outline, not hundreds of patches (0.1 s, not 0.7); its edge keeps a bar
        # narrower than a pixel (512 codes in 330 pixels) visible
        edges = np.arange(len(heights) + 1) - 0.5
        axes.stairs(heights, edges, fill=True, color=BAR_COLOUR, edgecolor=BAR_COLOUR, lw=0.8)
    if log_scale and (heights > 0).any():
        axes.set_yscale("log")
    if len(heights) <= 16:
        axes.set_xticks(range(len(heights)))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


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


# Not hyper-parameters: where the run writes, how it is watched and evaluated, Hydra itself.
HPARAMS_IGNORED = ("callbacks", "logger", "paths", "eval", "hydra")
_REFERENCE = re.compile(r"\$\{\s*[\w.]+\s*\}")


def is_copy(value: Any) -> bool:
    """Whether a saved config value is nothing but a reference to another key
    (``model.regulariser.beta: ${model.beta}``): a copy, whose source is the key to show."""
    return isinstance(value, str) and _REFERENCE.fullmatch(value) is not None


def config_hparams(config: Any) -> dict[str, Any]:
    """The run's hyper-parameters for the HParams tab: the flattened, resolved config (an
    OmegaConf ``DictConfig``) less the keys that say nothing of their own: the groups in
    ``HPARAMS_IGNORED``, Hydra's ``_partial_`` flags, and copies of another key
    (``model.regulariser.beta: ${model.beta}``), whose source is recorded.
    """
    from omegaconf import OmegaConf

    kept = {key: OmegaConf.select(config, key) for key in config if key not in HPARAMS_IGNORED}
    resolved = flatten_config(
        {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in kept.items()
        }
    )
    raw = flatten_config(OmegaConf.to_container(config, resolve=False))
    return {
        key: value
        for key, value in resolved.items()
        if not key.endswith("._partial_") and not is_copy(raw.get(key))
    }


def task_overrides() -> list[str]:
    """The command-line overrides of this Hydra job that name its run directory: Hydra's task
    overrides (a multirun job's own sweep values included) less the keys that
    ``hydra.job.config.override_dirname.exclude_keys`` leaves out of run names (paths, the
    progress bar, ...). ``[]`` outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    from vae.training.config import split_override

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    return [o for o in hydra.overrides.task if split_override(o)[1] not in excluded]


def trial_name(overrides: Sequence[str], run_dir: str | os.PathLike, default: str) -> str:
    """The run's name in the HParams tab: what the user set (``overrides``, Hydra's
    ``key=value`` strings, or ``default`` when there are none), then ``#`` and 6 hex digits of
    the run directory's path, so that two runs with the same settings stay two rows (the tab
    merges sessions of one name into one row and averages their metrics).

    ``model.beta=4 trainer.max_epochs=2 #3f9a2c``: the part that tells runs apart comes first,
    where the tab's narrow first column still shows it.
    """
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:6]
    return f"{' '.join(overrides) or default} #{digest}"


def log_hparams(loggers: Iterable[Any], params: Mapping[str, Any], trial: str) -> None:
    """Record the run's hyper-parameters for the HParams tab, as the row ``trial``.

    Only the session record is written, never an ``experiment`` record: with none, TensorBoard
    builds the tab from all runs in view (``tensorboard.plugins.hparams.backend_context``):

    * the columns are the union of every run's keys (a VQ-VAE's ``model.num_codes`` next to a
      Gaussian VAE's ``model.beta``); keys whose values differ between the runs come first and
      are the ones shown by default (a swept key always differs);
    * the metrics are every scalar tag of the runs, each at its latest value, read when the tab
      is opened: ``val/*`` of every model, and ``test/*`` once ``vae-eval`` has written them.

    An ``experiment`` record would fix both lists to one run's keys and metrics, and
    TensorBoard uses the first one it finds for all runs. Nor is a session-end record written:
    written here, at the start, it would call a run that later crashed a success.
    """
    start = plugin_data_pb2.SessionStartInfo(group_name=trial)
    for name, value in params.items():
        hparam = start.hparams[name]
        if isinstance(value, bool):  # before int: a bool is an int
            hparam.bool_value = value
        elif isinstance(value, (int, float)):
            hparam.number_value = value
        else:
            hparam.string_value = str(value)
    content = hparams_metadata.create_summary_metadata(
        plugin_data_pb2.HParamsPluginData(session_start_info=start)
    )
    summary = Summary(
        value=[Summary.Value(tag=hparams_metadata.SESSION_START_INFO_TAG, metadata=content)]
    )
    for writer in summary_writers(loggers):
        writer._get_file_writer().add_summary(summary)


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
