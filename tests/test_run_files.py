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


# --- start-up checks of the log directory, and a full disk ----------------------------------


def test_a_log_dir_that_cannot_hold_runs_is_named_with_the_reason(tmp_path: Path, monkeypatch):
    from vae.training import runs

    (tmp_path / "a_file").write_text("")
    assert runs.log_dir_problem(tmp_path / "new" / "logs") is None
    assert "a_file is a file" in runs.log_dir_problem(tmp_path / "a_file" / "logs")

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    # root may write anywhere, so the permission is simulated where the test runs as root
    monkeypatch.setattr(os, "access", lambda p, m: Path(p) != readonly and real_access(p, m))
    assert "readonly is not writable" in runs.log_dir_problem(readonly / "logs")

    usage = runs.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    assert "is full (4096 bytes free)" in runs.log_dir_problem(tmp_path / "logs")


def _torch_save_fails_like_a_full_disk(*args, **kwargs):
    """What ``torch.save`` raises when the disk fills: a RuntimeError in the context of ENOSPC."""
    import errno

    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    from vae.training import checkpoints
    from vae.training.checkpoints import DiskFullError

    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {}, "global_step": 5}, tmp_path / "last.ckpt")
    before = (tmp_path / "last.ckpt").read_bytes()
    monkeypatch.setattr(checkpoints.torch, "save", _torch_save_fails_like_a_full_disk)
    with pytest.raises(DiskFullError, match="last.ckpt: the previous last.ckpt is kept unchanged"):
        io.save_checkpoint({"state_dict": {}, "global_step": 9}, tmp_path / "last.ckpt")
    with pytest.raises(DiskFullError, match="no best.ckpt had been written yet"):
        io.save_checkpoint({"state_dict": {}}, tmp_path / "best.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary left"


DISK_FILLS_AT_SECOND_LAST_SAVE = """
import os
import sys
import torch
from experiments import train
from tests import test_run_files
from vae.training import checkpoints

saves = []
real_save = torch.save

def save(obj, handle, *args, **kwargs):
    if ".last.ckpt." in os.readlink(f"/proc/self/fd/{handle.fileno()}"):  # its temporary
        saves.append(1)
        if len(saves) == 2:
            test_run_files._torch_save_fails_like_a_full_disk()
    return real_save(obj, handle, *args, **kwargs)

checkpoints.torch.save = save
sys.argv = ["vae-train", *sys.argv[1:]]
train.main()
"""


def test_vae_train_on_a_full_disk_says_so_in_one_line_and_keeps_the_checkpoint(tmp_path: Path):
    import subprocess
    import sys

    from tests.cli import QUICK, REPO

    proc = subprocess.run(
        [sys.executable, "-c", DISK_FILLS_AT_SECOND_LAST_SAVE, "trainer.max_epochs=2", *QUICK],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vae-train: error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no space left on the device while saving" in errors[0]
    assert "the previous last.ckpt is kept unchanged" in errors[0]
    (last,) = tmp_path.glob("logs/*/*/checkpoints/last.ckpt")
    assert f"resume with: vae-train ckpt_path={last.parent.parent}" in errors[0]
    assert read_checkpoint(last)["global_step"] == 23  # the first epoch's save
    assert not list(last.parent.glob(".*.tmp"))


def test_a_callback_set_to_null_is_switched_off(tmp_path: Path):
    from tests.cli import QUICK, last_line, read_metrics, run_cli
    from vae.training import tags

    proc = run_cli(
        "vae-train",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        *QUICK,
        "callbacks.throughput=null",
        "callbacks.progress_bar=null",
        cwd=tmp_path,
    )
    metrics = read_metrics(tmp_path / last_line(proc.stdout))
    assert tags.TRAIN_SAMPLES_PER_S not in metrics and metrics["global_step"] == 3
