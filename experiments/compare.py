"""`vae-compare LOGDIR [LOGDIR ...]`: one row per run, the config keys that differ, the metrics.

    vae-compare logs/beta_sweep
    vae-compare logs --metrics val/elbo,val/kl,test/nll_iw --out reports/beta

Every run under the given folders is found (a run is a folder with TensorBoard event files or
a ``metrics.json``; multirun jobs included). Final scalars are read with TensorBoard's own
``EventAccumulator`` (the last value of each tag), completed by ``metrics.json``; each run's
config comes from its ``.hydra/config.yaml`` and ``.hydra/overrides.yaml``. Written to ``--out``:

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


class CompareError(ValueError):
    """vae-compare cannot produce a table; the message says why."""


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


def read_config(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(flattened config as saved, the overrides) of a run; empty where the files are missing."""
    from omegaconf import OmegaConf

    from vae.training.tensorboard import flatten_config

    config: dict[str, Any] = {}
    overrides: list[str] = []
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        container = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        config = flatten_config(container)
        config = _resolve_group_choices(config, run_dir / ".hydra" / "hydra.yaml")
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        overrides = [str(o) for o in (OmegaConf.load(overrides_file) or [])]
    return config, overrides


def _resolve_group_choices(config: dict[str, Any], hydra_file: Path) -> dict[str, Any]:
    """Replace ``${choice:model}`` (vae-train's default run name) by the group option the run
    used, read from the run's saved ``hydra.runtime.choices``."""
    import re

    from omegaconf import OmegaConf

    if not hydra_file.is_file():
        return config
    pattern = re.compile(r"\$\{choice:([\w/]+)\}")
    if not any(isinstance(v, str) and pattern.search(v) for v in config.values()):
        return config
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices") or {}
    return {
        key: pattern.sub(lambda m: str(choices.get(m.group(1), m.group(0))), value)
        if isinstance(value, str)
        else value
        for key, value in config.items()
    }


def read_run(run_dir: Path) -> Run:
    run = Run(path=run_dir)
    run.config, run.overrides = read_config(run_dir)
    run.series = read_scalars(run_dir)
    run.final = {tag: points[-1][1] for tag, points in run.series.items() if points}
    metrics_file = run_dir / METRICS_FILE
    if metrics_file.is_file():
        try:
            saved = json.loads(metrics_file.read_text())
        except json.JSONDecodeError as err:
            print(
                f"vae-compare: note: {metrics_file} is not valid JSON ({err}); ignored.",
                file=sys.stderr,
            )
            saved = {}
        for key, value in saved.items():
            if (
                key not in run.final
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                run.final[key] = float(value)
    return run


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
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(points)


def plot_learning_curves(runs: Sequence[Run], tags: Sequence[str], path: Path) -> list[str]:
    """One panel per tag that any run has; returns the tags drawn."""
    drawn = [t for t in tags if any(t in run.series for run in runs)]
    if not drawn:
        return []
    plt = _pyplot()
    columns = min(2, len(drawn))
    rows = math.ceil(len(drawn) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(6.0 * columns, 3.6 * rows), dpi=110, squeeze=False
    )
    for ax, tag in zip(axes.flat, drawn, strict=False):
        for run in runs:
            if tag in run.series:
                steps, values = zip(*run.series[tag], strict=True)
                ax.plot(steps, values, label=run.label, marker="." if len(steps) < 30 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(4, len(labels)),
        fontsize=8,
        bbox_to_anchor=(0.5, 0.0),
    )
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return drawn


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
    runs = [read_run(p) for p in paths]
    keys = differing_keys(runs)
    name_runs(runs, keys)
    explicit = metrics is not None
    if metrics is None:  # the defaults that any run has
        metrics = [m for m in DEFAULT_METRICS if any(m in run.final for run in runs)]
    notes = []
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
