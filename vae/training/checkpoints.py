"""Checkpoints that survive crashes and refuse to load into the wrong model.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the target, so a process killed while saving leaves the
  previous ``last.ckpt`` whole. (Lightning's own writer stages the file through fsspec, whose
  temporary file may live on another filesystem, where the final move is a copy.)
* :func:`read_checkpoint` turns a missing, truncated or corrupted file into one clear
  :class:`CheckpointError`.
* :func:`remove_stale_temporaries` deletes the temporary files that a killed writer left
  behind; a resumed run calls it on its checkpoint folder before it writes there again.
* :func:`check_compatible` compares a checkpoint with the model about to load it and names
  the differing config keys and tensors, instead of a bare ``size mismatch`` traceback.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# The layout of the checkpoints this version writes (``checkpoint["format"]``). Format 2: the
# model's parts (encoder, decoder, regulariser, quantizer, likelihood) are submodules built from
# configs saved in its hyper-parameters. Older checkpoints are refused with a clear message.
CHECKPOINT_FORMAT = 2

# Model keys that may differ on resume (they do not change the weights' meaning).
RESUMABLE_CHANGES = frozenset({"lr", "optimizer", "num_images"})


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, unreadable, or from a different model/config."""


def umask_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, or raise :class:`CheckpointError` saying why not."""
    path = Path(path)
    if path.is_dir():
        folder = path if path.name == "checkpoints" else path / "checkpoints"
        present = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        raise CheckpointError(
            f"ckpt_path={path} is a directory; give a checkpoint file, e.g. "
            f"{folder / 'last.ckpt'} (checkpoints in {folder}: {present or 'none'})."
        )
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            present = sorted(p.name for p in path.parent.glob("*.ckpt"))
            hint = f" Checkpoints in {path.parent}: {present or 'none'}."
        raise CheckpointError(f"ckpt_path={path} does not exist.{hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"ckpt_path={path} is truncated or corrupted and cannot be read "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Use another checkpoint, e.g. the best-*.ckpt next to it."
        ) from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"ckpt_path={path} is not a Lightning checkpoint of this project (no 'state_dict')."
        )
    return dict(checkpoint)


def check_compatible(checkpoint: Mapping[str, Any], model: torch.nn.Module, path: str = "") -> None:
    """Raise :class:`CheckpointError` if ``checkpoint`` was not made by a model like ``model``.

    Checks, in order: the model class, the model's config keys (all but
    ``RESUMABLE_CHANGES``), then every tensor name and shape of the state dict.
    """
    where = f"ckpt_path={path}: " if path else ""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where}the checkpoint was written by an older kl-vae (format "
            f"{checkpoint.get('format', 1)}, this version reads format {CHECKPOINT_FORMAT}), "
            "whose models were laid out differently. Retrain, or use the kl-vae version that "
            "wrote it."
        )
    saved_class = checkpoint.get("model_class")
    if saved_class is not None and saved_class != type(model).__qualname__:
        raise CheckpointError(
            f"{where}the checkpoint holds a {saved_class}, but the config builds a "
            f"{type(model).__qualname__}. Use the same model=... as the original run."
        )
    differing = _differing_keys(
        "model", checkpoint.get("hyper_parameters"), model, ignored=RESUMABLE_CHANGES
    )
    if differing:
        raise CheckpointError(
            f"{where}the checkpoint was made with a different model config:\n  "
            + "\n  ".join(differing)
            + "\nRepeat the original run's model overrides (see .hydra/overrides.yaml in its run "
            "directory)."
        )
    saved_state = checkpoint["state_dict"]
    not_finite = [
        name
        for name, tensor in saved_state.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if not_finite:
        raise CheckpointError(
            f"{where}the checkpoint's weights are not finite (NaN or inf in "
            f"{', '.join(not_finite[:4])}{' ...' if len(not_finite) > 4 else ''}): it was saved "
            "after the training diverged. Use an earlier checkpoint, e.g. a best-*.ckpt."
        )
    expected = model.state_dict()
    problems = [f"missing {k}" for k in sorted(set(expected) - set(saved_state))]
    problems += [f"unexpected {k}" for k in sorted(set(saved_state) - set(expected))]
    problems += [
        f"{k}: checkpoint {tuple(saved_state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved_state and tuple(saved_state[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointError(
            f"{where}the checkpoint's weights do not fit this model:\n  " + "\n  ".join(shown)
        )


# DataModule keys that change where the data is read or how fast, not which examples are used.
DATA_KEYS_FREE_ON_RESUME = frozenset(
    {"root", "num_workers", "pin_memory", "on_device", "download", "search_paths"}
)


def check_same_data(checkpoint: Mapping[str, Any], datamodule: Any, path: str = "") -> None:
    """Raise :class:`CheckpointError` if the run would resume on other data: another dataset,
    split, binarization or batching (every DataModule key but ``DATA_KEYS_FREE_ON_RESUME``).
    Otherwise the resumed steps could train on the images that ``vae-eval`` tests on."""
    where = f"ckpt_path={path}: " if path else ""
    saved_class = checkpoint.get("datamodule_hparams_name") and next(
        (k for k in checkpoint if k.endswith("DataModule")), None
    )
    if saved_class and saved_class != type(datamodule).__qualname__:
        raise CheckpointError(
            f"{where}the checkpoint was trained on {saved_class}, but the config gives "
            f"{type(datamodule).__qualname__}. Use the same data=... as the original run."
        )
    differing = _differing_keys(
        "data",
        checkpoint.get("datamodule_hyper_parameters"),
        datamodule,
        ignored=DATA_KEYS_FREE_ON_RESUME,
    )
    if differing:
        raise CheckpointError(
            f"{where}the checkpoint was trained on other data:\n  "
            + "\n  ".join(differing)
            + "\nRepeat the original run's data overrides (see .hydra/overrides.yaml in its run "
            "directory)."
        )


def _differing_keys(
    section: str, saved: Mapping[str, Any] | None, current: Any, ignored: frozenset[str]
) -> list[str]:
    """``"<section>.<key>: checkpoint <old>, config <new>"`` for every hyper-parameter that
    both the checkpoint and ``current`` (a model or DataModule) have, outside ``ignored``,
    and that differs."""
    saved = saved or {}
    now = dict(getattr(current, "hparams", {}))
    return [
        f"{section}.{key}: checkpoint {saved[key]!r}, config {now[key]!r}"
        for key in sorted(set(saved) & set(now))
        if key not in ignored and _normalise(saved[key]) != _normalise(now[key])
    ]


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


TEMPORARY_PATTERN = ".*.ckpt.*.tmp"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``AtomicCheckpointIO``'s leftover temporaries in ``folder``; return their paths.

    A process killed between ``mkstemp`` and ``os.replace`` leaves ``.<name>.ckpt.<random>.tmp``
    next to the intact previous checkpoint. Only the run that owns the folder may call this
    (a resume does, before its trainer starts), because a live writer's file matches too.
    """
    removed = []
    for stale in sorted(Path(folder).glob(TEMPORARY_PATTERN)):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space; the previous one is intact."""


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` comes from a full disk or quota. ``torch.save`` reports a failed write
    as a RuntimeError about zip positions, with the ``OSError`` as its context."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic on a local filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )  # matches TEMPORARY_PATTERN
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, umask_mode())  # mkstemp's 0600 would differ from the run's files
            os.replace(temporary, target)
        except BaseException as err:
            Path(temporary).unlink(missing_ok=True)
            if _disk_full(err):
                kept = (
                    f"the previous {target.name} is kept unchanged"
                    if target.exists()
                    else f"no {target.name} had been written yet"
                )
                raise DiskFullError(
                    errno.ENOSPC, f"no space left on the device while saving {target}: {kept}"
                ) from None
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path)
