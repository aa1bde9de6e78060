"""`vae-compare` on two real tiny runs of a multirun: the differing keys, the final metrics as
TensorBoard and metrics.json hold them, the CSV/Markdown/PNG files, and the clear messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from experiments.compare import (
    compare,
    differing_keys,
    find_runs,
    main,
    read_run,
    short_names,
)
from tests.cli import run_cli
from vae.training import tags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real two-job multirun over model.beta (2 epochs each); returns its working dir."""
    workdir = tmp_path_factory.mktemp("compare")
    run_cli(
        "vae-train",
        "-m",
        "model.beta=0.5,4",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar.refresh_rate=0",
        cwd=workdir,
    )
    return workdir


@pytest.fixture(scope="module")
def compared(sweep):
    proc = run_cli("vae-compare", "logs", "--out", "report", cwd=sweep)
    return sweep, proc


def test_finds_both_multirun_jobs_and_nothing_else(sweep):
    runs = find_runs([sweep / "logs"])
    assert len(runs) == 2
    assert all((run / "checkpoints").is_dir() for run in runs)
    assert {run.parent for run in runs} == {runs[0].parent}  # the one sweep folder


def test_table_shows_the_differing_key_and_the_metrics(compared):
    workdir, proc = compared
    header = proc.stdout.splitlines()[0].split()
    assert header[:2] == ["run", "model.beta"]
    assert tags.VAL_ELBO in header and tags.VAL_KL in header
    assert not any(
        h.startswith(("paths.", "model.latent_dim", "trainer.max_epochs")) for h in header
    )
    with (workdir / "report" / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(float(row["model.beta"]) for row in rows) == [0.5, 4.0]
    for row in rows:
        run_dir = next((workdir / "logs").rglob(row["run"].split("/")[-1]))
        saved = json.loads((run_dir / "metrics.json").read_text())
        # The last val/* value in TensorBoard is the final metric that metrics.json holds.
        for tag in (tags.VAL_ELBO, tags.VAL_KL, tags.VAL_RECON):
            assert float(row[tag]) == pytest.approx(saved[tag], rel=1e-6), tag
    markdown = (workdir / "report" / "runs.md").read_text().splitlines()
    assert markdown[0].startswith("| run | model.beta |") and len(markdown) == 4


def test_writes_the_rate_distortion_and_learning_curve_pngs(compared):
    workdir, proc = compared
    for name in ("rate_distortion.png", "learning_curves.png"):
        image = imread(workdir / "report" / name)
        assert image.shape[0] > 300 and image.shape[1] > 400, name
        assert image[..., :3].std() > 0.05, f"{name} looks blank"
    assert "wrote" in proc.stdout.splitlines()[-1]


def test_labels_name_what_differs(sweep):
    result = compare([sweep / "logs"], out=sweep / "in_process")
    assert sorted(run.label for run in result["runs"]) == ["beta=0.5", "beta=4"]
    assert result["notes"] == []


def test_missing_metrics_are_named_not_a_traceback(sweep, tmp_path, capsys):
    logs = tmp_path / "logs"
    for run in find_runs([sweep / "logs"]):
        target = logs / run.name
        target.mkdir(parents=True)
        for item in run.iterdir():  # event files and metrics.json, not the checkpoints
            if item.is_file():
                (target / item.name).write_bytes(item.read_bytes())
    crashed = logs / "crashed_run"
    crashed.mkdir()
    (crashed / "metrics.json").write_text("{}")
    main([str(logs), "--metrics", "val/elbo,test/nll_iw", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "crashed_run: no metrics" in captured.err
    assert "test/nll_iw is missing in any run" in captured.err
    assert "crashed_run: no .hydra/config.yaml" in captured.err
    assert (tmp_path / "out" / "runs.csv").is_file()


def test_no_runs_is_a_clear_error_with_exit_code_2(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("vae-compare", "empty", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "no runs under empty" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "does_not_exist")])
    assert exit_info.value.code == 2


def test_differing_keys_and_short_names(tmp_path):
    runs = []
    for beta, extra in ((1, {}), (4, {"model.num_codes": 8})):
        folder = tmp_path / f"run{beta}"
        (folder / ".hydra").mkdir(parents=True)
        config = {"model": {"beta": beta, "latent_dim": 8}, "paths": {"output_dir": str(folder)}}
        if extra:
            config["model"]["num_codes"] = 8
        (folder / ".hydra" / "config.yaml").write_text(json.dumps(config))
        (folder / "metrics.json").write_text(json.dumps({"val/elbo": -float(beta)}))
        runs.append(read_run(folder))
    assert differing_keys(runs) == ["model.beta", "model.num_codes"]
    assert runs[1].final == {"val/elbo": -4.0}
    assert short_names(["model.beta", "data.batch_size", "model.batch_size"]) == {
        "model.beta": "beta",
        "data.batch_size": "data.batch_size",
        "model.batch_size": "model.batch_size",
    }
    # matplotlib leaves a label that starts with "_" out of the legend, so that one stays whole.
    assert short_names(["model._target_", "model.beta"]) == {
        "model._target_": "model._target_",
        "model.beta": "beta",
    }
