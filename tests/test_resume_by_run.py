"""`vae-train ckpt_path=<run>`: a resume restores the run's own config; only the keys given on
the command line change it, and the run's `.hydra/` then records the effective config."""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from tests.cli import QUICK, last_line, load_events, read_metrics, run_cli, scalar_series
from vae.training.runs import with_recorded_overrides


def _fake_run(tmp_path: Path, recorded: list[str]) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(recorded))
    return run


def test_the_recorded_overrides_complete_the_command_line_and_given_keys_win(tmp_path: Path):
    run = _fake_run(
        tmp_path,
        ["model=vae", "model.beta=2", "+model.extra=1", "trainer.max_epochs=1", "rollback=true"],
    )
    given = [f"ckpt_path={run}", "trainer.max_epochs=3", "model.extra=5", "--cfg=job"]
    assert with_recorded_overrides(given) == [
        "model=vae",
        "model.beta=2",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "trainer.max_epochs=3",
        "+model.extra=5",  # the recorded `+` is kept: the key is not in the base config
        "--cfg=job",
    ]


def test_a_command_line_without_a_resume_or_with_a_sweep_is_unchanged(tmp_path: Path):
    run = _fake_run(tmp_path, ["model.beta=2"])
    assert with_recorded_overrides(["model.beta=4"]) == ["model.beta=4"]
    sweep = ["-m", f"ckpt_path={run}", "model.beta=1,2"]
    assert with_recorded_overrides(sweep) == sweep


def test_resume_by_run_directory_restores_the_config_and_records_what_changed(tmp_path: Path):
    first = run_cli(
        "vae-train",
        "trainer.max_epochs=1",
        "model.latent_dim=4",
        "model.beta=2",
        *QUICK,
        cwd=tmp_path,
    )
    run = tmp_path / last_line(first.stdout)
    # Only the run directory and the one key that changes: latent_dim=4 and beta=2 come back
    # from the run's record (without them the model config would differ and be refused).
    resumed = run_cli("vae-train", f"ckpt_path={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert tmp_path / last_line(resumed.stdout) == run

    assert read_metrics(run)["global_step"] == 46
    assert [step for step, _ in scalar_series(load_events(run), "val/elbo")] == [23, 46]
    latest = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert (latest.trainer.max_epochs, latest.model.latent_dim, latest.model.beta) == (2, 4, 2)
    assert OmegaConf.load(run / ".hydra" / "first" / "config.yaml").trainer.max_epochs == 1
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.max_epochs=2" in overrides and "model.latent_dim=4" in overrides
    assert not any(o.startswith("ckpt_path") for o in overrides)
    (log,) = run.glob("train_resume_*.log")
    assert "Resumed from step 23; config changes: trainer.max_epochs: 1 -> 2" in log.read_text()
