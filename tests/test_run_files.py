"""The files of a run: modes like the run's other files, and paths that say what is wrong."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from experiments.evaluate import EvaluationError, locate_run
from vae.training.checkpoints import AtomicCheckpointIO, CheckpointError, read_checkpoint
from vae.training.runs import dir_suffix, write_metrics


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_and_metrics_get_the_umask_mode_not_0600(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
        write_metrics(tmp_path, {"val/elbo": -1.0})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "last.ckpt") == _mode(tmp_path / "plain.txt") == 0o644
    assert _mode(tmp_path / "metrics.json") == 0o644


@pytest.mark.parametrize("given", ["run", "run/checkpoints"])
def test_a_directory_as_ckpt_path_says_which_file_to_give(tmp_path: Path, given: str):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(
        CheckpointError,
        match=r"is a directory; give a checkpoint file, e\.g\. .*"
        r"run/checkpoints/last\.ckpt .*\['last\.ckpt'\]",
    ):
        read_checkpoint(tmp_path / given)


def test_vae_eval_on_a_missing_path_names_the_path_not_a_config(tmp_path: Path):
    with pytest.raises(EvaluationError, match="missing does not exist: give a checkpoint file"):
        locate_run(str(tmp_path / "missing"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert locate_run(str(tmp_path / "run" / "checkpoints")) == (
        tmp_path / "run" / "checkpoints" / "last.ckpt",
        tmp_path / "run",
    )


def test_a_run_name_from_a_deletion_override_pastes_unquoted():
    suffix = dir_suffix("~callbacks.progress_bar__model.beta-4")
    assert "~" not in suffix
    path = f"logs/vae_digits/2026-11-30_06-46-17_863bdc{suffix}/checkpoints/last.ckpt"
    (parsed,) = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])
    assert parsed.value() == path
