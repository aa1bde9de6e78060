"""`vae-compare` on two real tiny runs of a multirun: the differing keys, the final metrics as
TensorBoard and metrics.json hold them, the CSV/Markdown/PNG files, and the clear messages;
on fake run folders: a VAE and a VQ-VAE side by side, and runs whose files are broken."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from matplotlib.image import imread

from experiments.compare import (
    Run,
    compare,
    differing_keys,
    find_runs,
    main,
    read_run,
    short_names,
)
from experiments.compare_plots import learning_curves_figure
from tests.cli import QUICK, run_cli
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
    # A multirun's jobs are named by their number (the beta column says what differs); the
    # path column says where each run is.
    assert sorted(row["run"] for row in rows) == ["0", "1"]
    for row in rows:
        saved = json.loads((workdir / row["path"] / "metrics.json").read_text())
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


# --- fake run folders ---------------------------------------------------------------------------
def write_fake_run(
    folder: Path,
    config: object,
    metrics: object = None,
    curves: dict[str, list[float]] | None = None,
) -> Path:
    """A run folder as vae-train leaves it, written by hand: ``.hydra/config.yaml`` (JSON is
    YAML), ``metrics.json`` and, for ``curves`` (tag -> values at steps 1, 2, ...), an event file.
    ``config`` and ``metrics`` are written as given, so they may be lists or numbers; a ``str``
    is written verbatim (for broken files)."""
    from torch.utils.tensorboard import SummaryWriter

    (folder / ".hydra").mkdir(parents=True)
    as_text = lambda value: value if isinstance(value, str) else json.dumps(value)  # noqa: E731
    (folder / ".hydra" / "config.yaml").write_text(as_text(config))
    if metrics is not None:
        (folder / "metrics.json").write_text(as_text(metrics))
    if curves:
        with SummaryWriter(str(folder)) as writer:
            for tag, values in curves.items():
                for step, value in enumerate(values, start=1):
                    writer.add_scalar(tag, value, step)
    return folder


def vae_config(target: str, **model) -> dict:
    return {"model": {"_target_": target, "latent_dim": 8, **model}, "seed": 0}


CURVES = {"train/loss": [40.0, 35.0, 30.0], "val/elbo": [-38.0, -33.0], "val/kl": [2.0, 3.0]}
METRICS = {"val/elbo": -33.0, "val/kl": 3.0, "val/recon": 30.0}


@pytest.fixture
def vae_and_vqvae(tmp_path) -> Path:
    """A folder with a VAE-like and a VQ-VAE-like run: only ``model._target_`` and the keys of
    each model differ. The VQ-VAE has no train/loss curve, the first panel of the plot."""
    logs = tmp_path / "logs"
    write_fake_run(logs / "vae", vae_config("vae.models.GaussianVAE", beta=1.0), METRICS, CURVES)
    vq_curves = {tag: values for tag, values in CURVES.items() if tag != "train/loss"}
    vq_metrics = {**METRICS, "val/perplexity": 12.0}
    write_fake_run(logs / "vq", vae_config("vae.models.VQVAE", num_codes=16), vq_metrics, vq_curves)
    return logs


def legend_texts(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_a_vae_and_a_vqvae_get_a_table_each_unless_grouped_together(
    vae_and_vqvae, tmp_path, capsys
):
    main([str(vae_and_vqvae), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    # No run name in these configs: grouped by model (and data) class.
    headings = [line for line in captured.out.splitlines() if line.startswith("== ")]
    assert [h.split(":")[0] for h in headings] == ["== GaussianVAE", "== VQVAE"]
    assert "model._target_" not in captured.out and "Traceback" not in captured.err
    assert captured.out.splitlines()[-1].startswith("2 runs in 2 groups; wrote")
    for group in ("GaussianVAE", "VQVAE"):
        for name in ("runs.csv", "runs.md", "rate_distortion.png", "learning_curves.png"):
            assert (tmp_path / "out" / group / name).is_file(), (group, name)
    for name in ("runs.csv", "runs.md", "rate_distortion.png"):  # the overview
        assert (tmp_path / "out" / name).is_file(), name

    # A --group-by key that no run has is named, not silently ignored.
    typo = compare([vae_and_vqvae], out=tmp_path / "typo", group_by=["model.bta"])
    assert any(note.startswith("--group-by model.bta: no run") for note in typo["notes"])
    # --group-by none: one table with both, as before groups existed.
    result = compare([vae_and_vqvae], out=tmp_path / "together", group_by=[])
    assert result["header"][:2] == ["run", "model._target_"]
    assert not [p for p in (tmp_path / "together").iterdir() if p.is_dir()]
    figure = learning_curves_figure(result["runs"], ["train/loss", "val/elbo", "val/kl"])
    texts = legend_texts(figure)
    # One entry per run, also for the run that is not in the first panel.
    assert len(texts) == 2
    assert any("GaussianVAE" in text for text in texts) and any("VQVAE" in text for text in texts)
    # The same run has the same colour in every panel it is drawn in.
    colours = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert len(colours) == 2 and all(len(c) == 1 for c in colours.values())


def test_legend_keeps_labels_that_start_with_an_underscore(tmp_path):
    """matplotlib drops a legend label that starts with "_"; with every label dropped, the old
    legend had 0 columns and raised. Such labels are shown, and the legend has >= 1 column."""
    runs = [
        Run(path=tmp_path / name, label=label, series={"val/elbo": [(1, value), (2, value + 1)]})
        for name, label, value in (
            ("a", "_target_=vae.models.GaussianVAE", -40.0),
            ("b", "_target_=vae.models.VQVAE", -50.0),
        )
    ]
    figure = learning_curves_figure(runs, ["val/elbo", "val/kl"])
    texts = legend_texts(figure)
    assert [text.strip() for text in texts] == [run.label for run in runs]
    # A very long label is wrapped and cut in the legend (the table keeps it whole).
    runs[0].label = ", ".join(f"model.key{i}=value{i}" for i in range(60))
    figure = learning_curves_figure(runs, ["val/elbo"])
    first = legend_texts(figure)[0]
    assert len(first.splitlines()) <= 3 and max(map(len, first.splitlines())) <= 60
    assert first.startswith("model.key0=value0") and first.endswith("...")


def test_one_legend_entry_per_run_and_no_figure_without_curves(tmp_path):
    runs = [
        Run(path=tmp_path / "a", label="beta=1", series={"train/loss": [(1, 3.0), (2, 2.0)]}),
        Run(path=tmp_path / "b", label="beta=4", series={"val/elbo": [(2, -3.0)]}),
    ]
    assert learning_curves_figure(runs, ["val/kl"]) is None
    # Each run is in one panel only; the legend has both, not only the first panel's.
    figure = learning_curves_figure(runs, ["train/loss", "val/elbo"])
    assert legend_texts(figure) == ["beta=1", "beta=4"]


def test_runs_with_broken_files_are_skipped_with_a_note(tmp_path, capsys):
    logs = tmp_path / "logs"
    for beta in (1, 4):
        config = vae_config("vae.models.GaussianVAE", beta=beta)
        write_fake_run(logs / f"good{beta}", config, {**METRICS, "val/kl": float(beta)}, CURVES)
    config = vae_config("vae.models.GaussianVAE", beta=2)
    broken = {
        "list_metrics": (config, [1, 2, 3], "metrics.json"),
        "number_metrics": (config, "42", "metrics.json"),
        "invalid_json": (config, '{"val/elbo": -3', "metrics.json"),
        "invalid_yaml": ("model: {beta: [1\n", METRICS, "config.yaml"),
        "list_config": (["model.beta=2"], METRICS, "config.yaml"),
    }
    for name, (config_text, metrics, _) in broken.items():
        write_fake_run(logs / name, config_text, metrics, CURVES)
    main([str(logs), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(notes) == len(broken), captured.err
    for name, (_, _, bad_file) in broken.items():
        (note,) = [line for line in notes if f"/{name}:" in line]
        assert note.startswith("vae-compare: note: skipped ") and bad_file in note, note
    assert "Traceback" not in captured.err
    with (tmp_path / "out" / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["run"] for row in rows) == ["good1", "good4"]
    assert sorted(float(row["model.beta"]) for row in rows) == [1.0, 4.0]  # only good runs differ
    assert captured.out.splitlines()[-1].startswith("2 runs; wrote")


def test_unreadable_event_files_skip_the_run(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing import event_accumulator

    logs = tmp_path / "logs"
    for name in ("a", "b"):
        write_fake_run(logs / name, vae_config("vae.models.GaussianVAE"), METRICS, CURVES)
    reload = event_accumulator.EventAccumulator.Reload

    def reload_or_fail(self):
        if self.path.endswith("/b"):
            raise PermissionError(13, "Permission denied", self.path)
        return reload(self)

    monkeypatch.setattr(event_accumulator.EventAccumulator, "Reload", reload_or_fail)
    main([str(logs), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    (note,) = [line for line in captured.err.splitlines() if "skipped" in line]
    assert "/b:" in note and "event files" in note and "Permission denied" in note
    assert captured.out.splitlines()[-1].startswith("1 run; wrote")


def test_only_broken_runs_is_one_line_and_exit_code_2(tmp_path):
    logs = tmp_path / "logs"
    write_fake_run(logs / "list_metrics", vae_config("vae.models.VQVAE"), [1, 2])
    write_fake_run(logs / "invalid_yaml", "model: [", METRICS)
    proc = run_cli("vae-compare", "logs", "--out", "out", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("vae-compare: error: ") and "Traceback" not in proc.stderr
    assert "list_metrics" in line and "invalid_yaml" in line
    assert not (tmp_path / "out").exists()


# --- a log folder with several kinds of runs ------------------------------------------------------
def composed_run(folder: Path, overrides: list[str]) -> Path:
    """A run folder whose .hydra files are what vae-train saves for ``overrides`` (the config
    composed by Hydra from conf/, interpolations as written; the group choices; the overrides),
    with made-up metrics and curves."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose("config", overrides=overrides, return_hydra_config=True)
    container = OmegaConf.to_container(config, resolve=False)
    choices = container.pop("hydra")["runtime"]["choices"]
    write_fake_run(folder, container, METRICS, CURVES)
    hydra = {"hydra": {"runtime": {"choices": choices}}}
    (folder / ".hydra" / "hydra.yaml").write_text(json.dumps(hydra))
    (folder / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    return folder


@pytest.fixture(scope="module")
def mixed(sweep, tmp_path_factory) -> Path:
    """The real β sweep on digits (2 runs, logs/vae_digits/multirun_*/), a digits run with
    the conv architecture next to it, two VQ-VAE runs (code_dim 64 and 16) and a Fashion-MNIST
    run; the last four with configs as vae-train saves them. Returns the working folder."""
    import shutil

    work = tmp_path_factory.mktemp("mixed")
    shutil.copytree(sweep / "logs", work / "logs", ignore=shutil.ignore_patterns("checkpoints"))
    same = ["trainer.max_epochs=2", *QUICK]
    composed_run(
        work / "logs/vae_digits/2026-01-01_10-00-00_c0c0a1_model.arch-conv",
        ["model.arch=conv", *same],
    )
    composed_run(work / "logs/vqvae_digits/2026-01-01_10-00-01_a0a0a2", ["model=vqvae", *same])
    composed_run(
        work / "logs/vqvae_digits/2026-01-01_10-00-02_b0b0a3_model.code_dim-16",
        ["model=vqvae", "model.code_dim=16", *same],
    )
    composed_run(
        work / "logs/vae_fashion/2026-01-01_10-00-03_f0f0a4", ["experiment=vae_fashion", *QUICK]
    )
    return work


def sections(stdout: str) -> dict[str, list[str]]:
    """The printed tables by group name: the lines after each ``== NAME: ...`` heading."""
    found: dict[str, list[str]] = {}
    for block in stdout.strip().split("\n\n"):
        heading, *lines = block.splitlines()
        if heading.startswith("== "):
            found[heading[3:].split(":")[0]] = lines
    return found


def test_a_mixed_log_folder_gives_one_narrow_table_per_group(mixed):
    proc = run_cli("vae-compare", "logs", "--out", "report", cwd=mixed)
    tables = sections(proc.stdout)
    assert list(tables) == ["vae_digits", "vae_fashion", "vqvae_digits"]
    for name, lines in tables.items():
        assert all(len(line) < 120 for line in lines), (name, max(map(len, lines)))
    assert all(len(line) < 120 for line in proc.stdout.splitlines())
    # Only the keys that differ inside a group; the sweep's key first, then the single change.
    digits = tables["vae_digits"]
    assert digits[0].split()[:3] == ["run", "model.beta", "model.arch"]
    rows = [row.split()[:3] for row in digits[2:]]
    assert [row[1:] for row in rows] == [["0.5", "mlp"], ["1", "conv"], ["4", "mlp"]]
    # Named by vae-train's run id (and job number): the time and the overrides are left out.
    assert re.fullmatch(r"[0-9a-f]{6}/0", rows[0][0]) and rows[1][0] == "c0c0a1", rows
    assert tables["vqvae_digits"][0].split()[:2] == ["run", "model.code_dim"]
    assert tables["vae_fashion"][0].split()[:2] == ["run", tags.VAL_ELBO]  # one run: no keys
    assert "${" not in proc.stdout and "_target_" not in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("6 runs in 3 groups; wrote in report: runs.csv")
    for group in tables:
        rows = list(csv.DictReader((mixed / "report" / group / "runs.csv").open()))
        assert all("${" not in value for row in rows for value in row.values()), group
        for name in ("rate_distortion.png", "learning_curves.png"):
            image = imread(mixed / "report" / group / name)
            assert image[..., :3].std() > 0.05, f"{group}/{name} looks blank"
    overview = list(csv.DictReader((mixed / "report" / "runs.csv").open()))
    assert sorted({row["group"] for row in overview}) == list(tables) and len(overview) == 6


def test_each_figure_of_a_group_names_its_runs_by_the_differing_keys(mixed, tmp_path):
    import warnings

    from experiments.compare_plots import rate_distortion_figure

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compare([mixed / "logs"], out=tmp_path / "report")
    assert [str(w.message) for w in caught if "matplotlib" in w.filename] == []
    labels = {group.name: sorted(run.label for run in group.runs) for group in result["groups"]}
    assert labels == {
        "vae_digits": ["beta=0.5, arch=mlp", "beta=1, arch=conv", "beta=4, arch=mlp"],
        "vae_fashion": ["f0f0a4"],  # alone in its group: named by its run id
        "vqvae_digits": ["code_dim=16", "code_dim=64"],
    }
    for group in result["groups"]:
        for figure in (
            learning_curves_figure(group.runs, ["train/loss", "val/elbo", "val/kl"]),
            rate_distortion_figure(group.runs, "val/kl", "val/recon"),
        ):
            assert sorted(legend_texts(figure)) == labels[group.name]


def test_interpolations_are_resolved_and_aliases_left_out(mixed):
    (vq64, vq16) = sorted((mixed / "logs" / "vqvae_digits").iterdir())
    run = read_run(vq16)
    # latent_dim: ${model.code_dim}; the quantizer's keys point at the model's.
    assert run.config["model.latent_dim"] == 16 and run.config["model.code_dim"] == 16
    assert run.config["model.quantizer.num_codes"] == run.config["model.num_codes"] > 0
    assert run.config["name"] == "vqvae_digits"  # ${choice:model}_${choice:data}
    assert {"model.latent_dim", "model.quantizer.num_codes"} <= run.aliases
    # Resolvers that only Hydra at the run's start could answer keep their text.
    assert run.config["paths.output_dir"] == "${hydra:runtime.output_dir}"
    assert differing_keys([read_run(vq64), run]) == ["model.code_dim"]


def test_resolved_config_falls_back_per_key():
    from experiments.compare import resolved_config

    config, aliases = resolved_config(
        {
            "model": {"arch": "mlp", "hidden_dims": [8, 4], "latent_dim": 8},
            "encoder": {"arch": "${model.arch}", "dims": "${model.hidden_dims}"},
            "name": "${choice:model}_${choice:data}",
            "started": "${now:%Y-%m-%d}",
            "output": "${paths.output_dir}",
            "paths": {"output_dir": "${hydra:runtime.output_dir}"},
            "missing": "${model.nothing}",
            "text": "z${model.latent_dim}",
        },
        choices={"model": "vae"},
    )
    assert config["encoder.arch"] == "mlp" and config["encoder.dims"] == "[8, 4]"
    assert config["name"] == "vae_${choice:data}"  # only choices the run saved
    assert config["started"] == "${now:%Y-%m-%d}"  # not today's date
    assert config["output"] == "${hydra:runtime.output_dir}"  # nor Hydra's answer
    assert config["missing"] == "${model.nothing}" and config["text"] == "z8"
    assert aliases == {"encoder.arch", "encoder.dims", "output", "missing"}


def test_no_two_runs_of_a_figure_share_a_style(tmp_path):
    from experiments.compare_plots import rate_distortion_figure

    for count in (23, 45):
        runs = [
            Run(
                path=tmp_path / f"r{i}",
                label=f"seed={i}",
                series={"val/elbo": [(1, -i), (2, -i - 1.0)]},
                final={"val/kl": float(i), "val/recon": 30.0 - i},
            )
            for i in range(count)
        ]
        (ax,) = learning_curves_figure(runs, ["val/elbo"]).axes
        styles = {(str(line.get_color()), line.get_linestyle()) for line in ax.get_lines()}
        assert len(styles) == count
        (ax,) = rate_distortion_figure(runs, "val/kl", "val/recon").axes
        points = [c for c in ax.collections]
        marks = {(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes()) for c in points}
        assert len(points) == count and len(marks) == count
        assert len(legend_texts(ax.figure)) == count


def test_run_names_in_a_table(tmp_path):
    from experiments.compare import table_names

    sweep = tmp_path / "vae_digits" / "multirun_2026-01-01_10-00-00_de338f"
    paths = [
        sweep / "0_model.beta-0.5__trainer.max_epochs-2",
        sweep / "1_model.beta-4",
        tmp_path / "vae_digits" / "2026-01-01_10-00-05_9523fc_model.arch-conv",
        tmp_path / "vae_digits" / "my_run_2",
    ]
    assert table_names(paths) == ["de338f/0", "de338f/1", "9523fc", "my_run_2"]
    assert table_names(paths[:2]) == ["0", "1"]  # one multirun: its job numbers
    # Outside a multirun a number is a folder name like any other; names that would clash
    # are given whole.
    assert table_names([tmp_path / "2_a", tmp_path / "3"]) == ["2_a", "3"]
    twins = [
        tmp_path / "2026-01-01_10-00-00_aaaaaa_model.beta-1",
        tmp_path / "2026-01-01_10-00-00_aaaaaa",
    ]
    assert table_names(twins) == [twins[0].name, twins[1].name]


def test_a_fast_dev_run_is_skipped_as_not_a_result(tmp_path, capsys):
    logs = tmp_path / "logs"
    for beta in (1, 4):
        config = vae_config("vae.models.GaussianVAE", beta=beta)
        write_fake_run(logs / f"run{beta}", config, METRICS, CURVES)
    config = vae_config("vae.models.GaussianVAE", beta=2)
    write_fake_run(logs / "smoke", config, {**METRICS, "fast_dev_run": True}, CURVES)
    main([str(logs), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "/smoke: a debug=fdr run, one batch of each loop: not a result" in captured.err
    assert captured.out.splitlines()[-1].startswith("2 runs; wrote")
