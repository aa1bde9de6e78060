"""`vae-compare LOGDIR [LOGDIR ...]`: one row per run, the config keys that differ, the metrics.

    vae-compare logs/beta_sweep
    vae-compare logs --metrics val/elbo,val/kl,test/nll_iw --out reports/beta

Every run under the given folders is found (a run is a folder with TensorBoard event files or
a ``metrics.json``; multirun jobs included). Final scalars are read with TensorBoard's own
``EventAccumulator`` (the last value of each tag), completed by ``metrics.json``; each run's
config comes from its ``.hydra/config.yaml`` and ``.hydra/overrides.yaml``. A run whose files
cannot be read (a ``metrics.json`` that is not a JSON object, a corrupt config, unreadable event
files) is left out with a note that says why; the others are compared. Written to ``--out``:

* ``runs.csv`` and ``runs.md``: the table that is also printed;
* ``rate_distortion.png``: KL (rate) against reconstruction NLL (distortion), one labelled point
  per run, both in nats per example;
* ``learning_curves.png``: the chosen tags against the training step, one line per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_METRICS = (
    "val/elbo",
    "val/recon",
    "val/kl",
    "val/bits_per_dim",
    "val/active_units",
    "val/perplexity",
    "val/codebook_usage",
    "test/nll_iw",
    "test/elbo",
    "test/label_kl",
    "test/label_kl_reverse",
    "test/classifier_score",
)
DEFAULT_CURVES = ("train/loss", "val/elbo", "val/kl", "val/recon")
# Config keys that differ between runs without saying anything about the experiment: the same
# ones vae-train leaves out of the HParams record (where files go, logging, callbacks).
IGNORED_PREFIXES = ("paths.", "hydra.", "callbacks.", "logger.", "eval.")
IGNORED_KEYS = frozenset({"trainer.default_root_dir", "ckpt_path"})
EVENT_FILE_PREFIX = "events.out.tfevents"
METRICS_FILE = "metrics.json"
SKIPPED_FOLDERS = frozenset({"checkpoints", ".hydra", "comparison"})
MISSING = "-"
# Legend entries and point annotations: a run label is wrapped to lines of this many characters
# and cut after this many lines (the table keeps it whole). At font size 8, 60 characters are
# about 4 inches, so two entries fit side by side on the 12-inch learning-curves figure.
PLOT_LABEL_WIDTH = 60
PLOT_LABEL_LINES = 3
LEGEND_FONT_SIZE = 8


class CompareError(ValueError):
    """vae-compare cannot produce a table; the message says why."""


class UnreadableRunError(ValueError):
    """One run's files cannot be read; the run is left out and the message says why."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    name: str = ""
    label: str = ""


# --- finding and reading runs ---------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or any(
        entry.name.startswith(EVENT_FILE_PREFIX) for entry in os.scandir(path) if entry.is_file()
    )


def find_runs(logdirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run folder under ``logdirs`` (recursively), sorted, without duplicates."""
    found: set[Path] = set()
    for logdir in logdirs:
        root = Path(logdir)
        if not root.is_dir():
            raise CompareError(
                f"{logdir} is not a directory; pass the folder of your runs, e.g. logs"
            )
        for folder, subfolders, _ in os.walk(root):
            subfolders[:] = sorted(
                d for d in subfolders if d not in SKIPPED_FOLDERS and not d.startswith(".")
            )
            if is_run_dir(Path(folder)):
                found.add(Path(folder).resolve())
    return sorted(found)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of one run, ordered by step (TensorBoard's reader, not protobufs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    series = {}
    for tag in events.Tags().get("scalars", []):
        points = sorted(events.Scalars(tag), key=lambda e: (e.step, e.wall_time))
        series[tag] = [(int(e.step), float(e.value)) for e in points]
    return series


def _one_line(err: BaseException, limit: int = 160) -> str:
    """An exception's message on one line (YAML errors span several), cut at ``limit``."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_yaml(path: Path, run_dir: Path) -> Any:
    """A run's YAML file as plain containers (interpolations left as written)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import MarkedYAMLError, YAMLError

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    # OSError: unreadable; ValueError: not UTF-8; the others: not YAML, or not OmegaConf's YAML.
    except (OSError, ValueError, YAMLError, OmegaConfBaseException) as err:
        where = path.relative_to(run_dir)
        mark = getattr(err, "problem_mark", None)
        if isinstance(err, MarkedYAMLError) and err.problem and mark:  # without the file name
            why = f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
        else:
            why = _one_line(err)
        raise UnreadableRunError(f"{where} is not valid YAML ({why})") from err


def _kind(value: Any) -> str:
    """What a JSON or YAML value is, in the words of those formats."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else type(value).__name__


def read_config(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(flattened config as saved, the overrides) of a run; empty where the files are missing.

    Raises UnreadableRunError for a file that is not YAML or does not hold the expected kind.
    """
    from vae.training.tensorboard import flatten_config

    config: dict[str, Any] = {}
    overrides: list[str] = []
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        container = _load_yaml(config_file, run_dir)
        if not isinstance(container, dict):
            raise UnreadableRunError(
                f".hydra/config.yaml holds {_kind(container)}, not a mapping of config keys"
            )
        config = flatten_config(container)
        config = _resolve_group_choices(config, run_dir)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        saved = _load_yaml(overrides_file, run_dir)
        if saved is not None and not isinstance(saved, list):
            raise UnreadableRunError(
                f".hydra/overrides.yaml holds {_kind(saved)}, not a list of overrides"
            )
        overrides = [str(o) for o in saved or []]
    return config, overrides


def _resolve_group_choices(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Replace ``${choice:model}`` (vae-train's default run name) by the group option the run
    used, read from the run's saved ``hydra.runtime.choices``."""
    import re

    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return config
    pattern = re.compile(r"\$\{choice:([\w/]+)\}")
    if not any(isinstance(v, str) and pattern.search(v) for v in config.values()):
        return config
    choices = _load_yaml(hydra_file, run_dir)
    for key in ("hydra", "runtime", "choices"):
        choices = choices.get(key) if isinstance(choices, dict) else None
    choices = choices if isinstance(choices, dict) else {}
    return {
        key: pattern.sub(lambda m: str(choices.get(m.group(1), m.group(0))), value)
        if isinstance(value, str)
        else value
        for key, value in config.items()
    }


def read_metrics_file(run_dir: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` ({} if there is none); it must hold a JSON object."""
    metrics_file = run_dir / METRICS_FILE
    if not metrics_file.is_file():
        return {}
    try:
        saved = json.loads(metrics_file.read_text())
    # OSError: unreadable; ValueError: not UTF-8 or not JSON (JSONDecodeError is one).
    except (OSError, ValueError) as err:
        raise UnreadableRunError(f"{METRICS_FILE} is not valid JSON ({_one_line(err)})") from err
    if not isinstance(saved, dict):
        raise UnreadableRunError(
            f"{METRICS_FILE} holds {_kind(saved)}, not an object of metric values"
        )
    return saved


def read_run(run_dir: Path) -> Run:
    """One run's config, scalar series and final metrics.

    Raises UnreadableRunError, naming the file and the problem, when one of them cannot be read.
    """
    run = Run(path=run_dir)
    run.config, run.overrides = read_config(run_dir)
    saved = read_metrics_file(run_dir)
    try:
        run.series = read_scalars(run_dir)
    # TensorBoard's reader skips a corrupt record by itself; what it raises (OSError, its own
    # errors, protobuf's DecodeError) has no common base, so any failure here means unreadable.
    except Exception as err:
        raise UnreadableRunError(
            f"its event files cannot be read ({type(err).__name__}: {_one_line(err)})"
        ) from err
    run.final = {tag: points[-1][1] for tag, points in run.series.items() if points}
    for key, value in saved.items():
        if key not in run.final and isinstance(value, (int, float)) and not isinstance(value, bool):
            run.final[key] = float(value)
    return run


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory where it is below it, else whole."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_runs(paths: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """(the runs that could be read, "FOLDER: why" for each run that could not)."""
    runs, unreadable = [], []
    for path in paths:
        try:
            runs.append(read_run(path))
        except UnreadableRunError as err:
            unreadable.append(f"{_shown_path(path)}: {err}")
    return runs, unreadable


# --- the table --------------------------------------------------------------------------------
def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (absent counts as a value).

    Runs without a saved config do not take part.
    """
    runs = [run for run in runs if run.config]
    keys = sorted({k for run in runs for k in run.config})
    keys = [k for k in keys if not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS]
    return [k for k in keys if len({repr(run.config.get(k, MISSING)) for run in runs}) > 1]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``model.beta`` -> ``beta`` where the last component is unique among ``keys``.

    ``model._target_`` stays whole: matplotlib hides legend labels that start with ``_``.
    """
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {
        k: (s if last.count(s) == 1 and not s.startswith("_") else k)
        for k, s in zip(keys, last, strict=True)
    }


def name_runs(runs: Sequence[Run], keys: Sequence[str]) -> None:
    """Each run's table name (its path below the common folder) and plot label (what differs)."""
    paths = [run.path for run in runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    short = short_names(keys)
    for run in runs:
        run.name = str(run.path.relative_to(common)) if run.path != common else run.path.name
        parts = [f"{short[k]}={run.config.get(k, MISSING)}" for k in keys]
        run.label = ", ".join(parts) if parts else run.path.name


def format_value(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def build_table(runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str]):
    """(header, rows) with one row per run: its name, the differing keys, the metrics."""
    header = ["run", *keys, *metrics]
    rows = [
        [run.name, *(run.config.get(k) for k in keys), *(run.final.get(m) for m in metrics)]
        for run in runs
    ]
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header)] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def line(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    out = [line(header), line(["---"] * len(header))]
    out += [line(format_value(v) for v in row) for row in rows]
    return "\n".join(out) + "\n"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


# --- plots --------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    # Run labels are config values: a '$' in one must print as itself, not start mathtext.
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def plot_label(label: str) -> str:
    """A run label as a legend entry or a point annotation shows it: wrapped, cut after
    PLOT_LABEL_LINES lines, and never starting with "_", which matplotlib takes to mean "leave
    this out of the legend" (also for labels passed explicitly)."""
    text = textwrap.fill(label, PLOT_LABEL_WIDTH, max_lines=PLOT_LABEL_LINES, placeholder=" ...")
    return " " + text if text.startswith("_") else text


def legend_columns(labels: Sequence[str], figure_width_inches: float) -> int:
    """How many legend entries fit side by side: at most 4, at least 1 (0 makes matplotlib
    raise)."""
    widest = max((len(line) for label in labels for line in label.splitlines()), default=1)
    # A character is ~0.6 of the font size wide; ~6 more for the line sample and the gap.
    characters_across = figure_width_inches * 72 / (0.6 * LEGEND_FONT_SIZE)
    return max(1, min(4, len(labels), int(characters_across // (widest + 6))))


def plot_rate_distortion(runs: Sequence[Run], rate: str, distortion: str, path: Path) -> int:
    """Scatter of (rate, distortion) per run, labelled; returns the number of points drawn."""
    points = [
        (run.final[rate], run.final[distortion], run.label)
        for run in runs
        if rate in run.final and distortion in run.final
    ]
    if not points:
        return 0
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    rates, distortions, labels = zip(*points, strict=True)
    ax.scatter(rates, distortions, s=36, zorder=3)
    for x, y, label in points:
        ax.annotate(
            plot_label(label), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    # Lines of constant -ELBO = rate + distortion: moving along one trades bits for fidelity.
    low, high = min(r + d for r, d, _ in points), max(r + d for r, d, _ in points)
    x_max = max(rates) * 1.1 + 1e-9
    for total in {low, high}:
        ax.plot([0, x_max], [total, total - x_max], ls=":", lw=0.8, color="grey", zorder=1)
    ax.set_xlim(left=min(0.0, min(rates)), right=x_max)
    margin = 0.1 * (max(distortions) - min(distortions) or abs(max(distortions)) or 1.0)
    ax.set_ylim(min(distortions) - margin, max(distortions) + margin)
    ax.set_xlabel(f"rate: {rate} (nats per example)")
    ax.set_ylabel(f"distortion: {distortion} (nats per example)")
    ax.set_title("Rate-distortion (dotted: constant -ELBO)")
    ax.grid(alpha=0.3)
    # Not tight_layout: it cannot fit an annotation that runs past the axes and warns; the
    # tight bounding box widens the saved image to take it in instead.
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return len(points)


def curve_tags(runs: Sequence[Run], tags: Sequence[str]) -> list[str]:
    """The ``tags`` that some run has points of: the panels of the learning curves."""
    return [tag for tag in tags if any(run.series.get(tag) for run in runs)]


def learning_curves_figure(runs: Sequence[Run], tags: Sequence[str]):
    """One panel per tag that any run has, one colour per run in every panel, and a legend
    below with one entry per run drawn; None when no run has any of ``tags``."""
    drawn = curve_tags(runs, tags)
    if not drawn:
        return None
    plt = _pyplot()
    columns = min(2, len(drawn))
    rows = math.ceil(len(drawn) / columns)
    width = 6.0 * columns
    fig, axes = plt.subplots(rows, columns, figsize=(width, 3.6 * rows), dpi=110, squeeze=False)
    # The colour is fixed per run: each panel's own colour cycle would give a run that is
    # missing from one panel another run's colour there.
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    legend: dict[int, tuple[Any, str]] = {}  # run index -> (its first line, its legend label)
    for ax, tag in zip(axes.flat, drawn, strict=False):
        for index, run in enumerate(runs):
            if run.series.get(tag):
                steps, values = zip(*run.series[tag], strict=True)
                label = plot_label(run.label)
                (line,) = ax.plot(
                    steps,
                    values,
                    label=label,
                    color=colours[index % len(colours)],
                    marker="." if len(steps) < 30 else None,
                )
                legend.setdefault(index, (line, label))
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    fig.tight_layout()
    if legend:  # handles passed explicitly: a run missing from the first panel is listed too
        handles, labels = zip(*(legend[i] for i in sorted(legend)), strict=True)
        fig.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),  # below the panels; savefig's tight box takes it in
            ncol=legend_columns(labels, width),
            fontsize=LEGEND_FONT_SIZE,
        )
    return fig


def plot_learning_curves(runs: Sequence[Run], tags: Sequence[str], path: Path) -> list[str]:
    """Write :func:`learning_curves_figure` to ``path``; returns the tags drawn."""
    fig = learning_curves_figure(runs, tags)
    if fig is None:
        return []
    fig.savefig(path, bbox_inches="tight")
    _pyplot().close(fig)
    return curve_tags(runs, tags)


# --- the command --------------------------------------------------------------------------------
def compare(
    logdirs: Sequence[str],
    metrics: Sequence[str] | None = None,
    out: str | os.PathLike = "comparison",
    rate: str = "val/kl",
    distortion: str = "val/recon",
    curves: Sequence[str] = DEFAULT_CURVES,
) -> dict[str, Any]:
    """Find, read, tabulate and plot; return what was written and what was missing."""
    paths = find_runs(logdirs)
    if not paths:
        raise CompareError(
            f"no runs under {', '.join(map(str, logdirs))}: a run is a folder with TensorBoard "
            "event files or a metrics.json, as made by vae-train."
        )
    runs, unreadable = read_runs(paths)
    if not runs:  # one line, however many runs: the first three reasons
        more = f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise CompareError(
            f"no run under {', '.join(map(str, logdirs))} can be read: "
            + "; ".join(unreadable[:3])
            + more
        )
    keys = differing_keys(runs)
    name_runs(runs, keys)
    explicit = metrics is not None
    if metrics is None:  # the defaults that any run has
        metrics = [m for m in DEFAULT_METRICS if any(m in run.final for run in runs)]
    notes = [f"skipped {why}" for why in unreadable]
    for run in runs:
        if not run.config:
            notes.append(f"{run.name}: no .hydra/config.yaml, so its config is not compared.")
        if not run.final:
            notes.append(
                f"{run.name}: no metrics (no scalars in its event files and no metrics.json); "
                "did it stop before its first validation?"
            )
    with_metrics = [run for run in runs if run.final]
    for metric in metrics:
        lacking = [run.name for run in with_metrics if metric not in run.final]
        if lacking and (explicit or len(lacking) < len(with_metrics)):
            where = "any run" if len(lacking) == len(with_metrics) else ", ".join(lacking)
            notes.append(f"{metric} is missing in {where}.")
    header, rows = build_table(runs, keys, metrics)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "runs.csv", header, rows)
    (out_dir / "runs.md").write_text(markdown_table(header, rows))
    written = [out_dir / "runs.csv", out_dir / "runs.md"]
    if plot_rate_distortion(runs, rate, distortion, out_dir / "rate_distortion.png"):
        written.append(out_dir / "rate_distortion.png")
    else:
        notes.append(f"rate_distortion.png not written: no run has both {rate} and {distortion}.")
    if plot_learning_curves(runs, curves, out_dir / "learning_curves.png"):
        written.append(out_dir / "learning_curves.png")
    else:
        notes.append(f"learning_curves.png not written: no run has any of {', '.join(curves)}.")
    return {
        "table": text_table(header, rows),
        "header": header,
        "rows": rows,
        "written": written,
        "notes": notes,
        "runs": runs,
    }


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-compare",
        description="Table and plots of the runs under LOGDIR(s): differing config keys and final metrics.",
    )
    parser.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="folders to search for runs")
    parser.add_argument(
        "--metrics",
        type=_comma_list,
        default=None,
        help="comma-separated tags for the table (default: common val/ and test/ tags)",
    )
    parser.add_argument(
        "--out", default="comparison", help="folder for runs.csv, runs.md and the PNGs"
    )
    parser.add_argument("--rate", default="val/kl", help="x axis of rate_distortion.png")
    parser.add_argument("--distortion", default="val/recon", help="y axis of rate_distortion.png")
    parser.add_argument(
        "--curves",
        type=_comma_list,
        default=list(DEFAULT_CURVES),
        help="comma-separated tags for learning_curves.png",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = compare(
            args.logdirs, args.metrics, args.out, args.rate, args.distortion, args.curves
        )
    except CompareError as err:
        print(f"vae-compare: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result["table"])
    for note in result["notes"]:
        print(f"vae-compare: note: {note}", file=sys.stderr)
    print(f"{len(result['runs'])} runs; wrote " + ", ".join(str(p) for p in result["written"]))


if __name__ == "__main__":
    main()
