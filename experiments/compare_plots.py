"""The figures of `vae-compare`: rate-distortion and learning curves of one group of runs.

A run here is anything with ``label`` (what the legend shows), ``final`` (tag -> last value) and
``series`` (tag -> [(step, value), ...]): :class:`experiments.compare.Run`. Each run of a figure
gets a style of its own (:func:`run_styles`), the same in both figures and in every panel, so a
run is found by its colour and line style wherever it is drawn.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.compare import Run

# Legend entries and point annotations: a run label is wrapped to lines of this many characters
# and cut after this many lines (the table keeps it whole). At font size 8, 60 characters are
# about 4 inches, so two entries fit side by side on the 12-inch learning-curves figure.
PLOT_LABEL_WIDTH = 60
PLOT_LABEL_LINES = 3
LEGEND_FONT_SIZE = 8
# Line styles and the point markers that go with them: with the 10 colours of matplotlib's
# default cycle, 40 runs get 40 different (colour, line style, marker) triples.
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
# Up to this many runs, the rate-distortion points also carry their label next to them.
ANNOTATED_RUNS = 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    # Run labels are config values: a '$' in one must print as itself, not start mathtext.
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def run_styles(count: int) -> list[dict[str, Any]]:
    """``count`` distinct styles (``color``, ``linestyle``, ``marker``), one per run.

    Up to 40 runs: the default colour cycle first with solid lines and circles, then again
    dashed with squares, and so on. Beyond that, ``count`` colours sampled from the ``turbo``
    colour map, so that no two runs share a colour.
    """
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if count <= len(cycle) * len(LINESTYLES):
        picks = [(cycle[i % len(cycle)], i // len(cycle)) for i in range(count)]
    else:
        colours = plt.get_cmap("turbo").resampled(count)
        picks = [(colours(i), i % len(LINESTYLES)) for i in range(count)]
    return [
        {"color": colour, "linestyle": LINESTYLES[kind], "marker": MARKERS[kind]}
        for colour, kind in picks
    ]


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


def _legend_below(fig, handles: Sequence[Any], labels: Sequence[str], width: float) -> None:
    """One legend under the panels (savefig's tight box takes it in), entries as given."""
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=legend_columns(labels, width),
        fontsize=LEGEND_FONT_SIZE,
    )


def draw_rate_distortion(ax, runs: Sequence[Run], rate: str, distortion: str) -> list[Any]:
    """Each run with both tags as one point in its style on ``ax``, labelled next to it when
    there are at most ANNOTATED_RUNS runs; returns the (handle, label) of each point."""
    styles = run_styles(len(runs))
    drawn = [
        (run, style)
        for run, style in zip(runs, styles, strict=True)
        if rate in run.final and distortion in run.final
    ]
    if not drawn:
        return []
    entries = []
    for run, style in drawn:
        label = plot_label(run.label)
        handle = ax.scatter(
            [run.final[rate]],
            [run.final[distortion]],
            s=36,
            zorder=3,
            color=style["color"],
            marker=style["marker"],
            label=label,
        )
        entries.append((handle, label))
    rates = [run.final[rate] for run, _ in drawn]
    distortions = [run.final[distortion] for run, _ in drawn]
    # Lines of constant -ELBO = rate + distortion: moving along one trades bits for fidelity.
    totals = [r + d for r, d in zip(rates, distortions, strict=True)]
    x_max = max(rates) * 1.1 + 1e-9
    for total in {min(totals), max(totals)}:
        ax.plot([0, x_max], [total, total - x_max], ls=":", lw=0.8, color="grey", zorder=1)
    ax.set_xlim(left=min(0.0, min(rates)), right=x_max)
    margin = 0.1 * (max(distortions) - min(distortions) or abs(max(distortions)) or 1.0)
    ax.set_ylim(min(distortions) - margin, max(distortions) + margin)
    if len(runs) <= ANNOTATED_RUNS:
        middle = sum(ax.get_xlim()) / 2
        for (x, y), (_, label) in zip(zip(rates, distortions, strict=True), entries, strict=True):
            right = x > middle  # the label on the side of the point towards the middle
            ax.annotate(
                label,
                (x, y),
                textcoords="offset points",
                xytext=(-5 if right else 5, 5),
                ha="right" if right else "left",
                fontsize=8,
            )
    ax.ticklabel_format(useOffset=False)  # 27.466, not 0.006 and "+2.746e1" in the corner
    ax.set_xlabel(f"rate: {rate} (nats per example)")
    ax.set_ylabel(f"distortion: {distortion} (nats per example)")
    ax.grid(alpha=0.3)
    return entries


def rate_distortion_figure(runs: Sequence[Run], rate: str, distortion: str):
    """Scatter of (rate, distortion), one point per run in its style, a legend below; None
    when no run has both tags."""
    if not any(rate in run.final and distortion in run.final for run in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    entries = draw_rate_distortion(ax, runs, rate, distortion)
    ax.set_title("Rate-distortion (dotted: constant -ELBO)")
    _legend_below(fig, *zip(*entries, strict=True), width=6.4)
    return fig


def plot_rate_distortion(runs: Sequence[Run], rate: str, distortion: str, path: Path) -> bool:
    """Write :func:`rate_distortion_figure` to ``path``; False when there is nothing to draw."""
    fig = rate_distortion_figure(runs, rate, distortion)
    if fig is None:
        return False
    # Not tight_layout: it cannot fit an annotation that runs past the axes and warns; the
    # tight bounding box widens the saved image to take it in instead.
    fig.savefig(path, bbox_inches="tight")
    _pyplot().close(fig)
    return True


def plot_rate_distortion_panels(
    groups: dict[str, Sequence[Run]], rate: str, distortion: str, path: Path
) -> int:
    """One rate-distortion panel per group (titled with its name, up to three across): groups
    never share axes. Returns the number of points drawn (0: no file written)."""
    drawable = {
        name: runs
        for name, runs in groups.items()
        if any(rate in run.final and distortion in run.final for run in runs)
    }
    if not drawable:
        return 0
    plt = _pyplot()
    columns = min(3, len(drawable))
    rows = math.ceil(len(drawable) / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(5.0 * columns, 4.0 * rows),
        dpi=110,
        squeeze=False,
        layout="constrained",
    )
    points = 0
    for ax, (name, runs) in zip(axes.flat, drawable.items(), strict=False):
        points += len(draw_rate_distortion(ax, runs, rate, distortion))
        ax.set_title(name)
    for ax in list(axes.flat)[len(drawable) :]:
        ax.axis("off")
    fig.suptitle("Rate-distortion per group (dotted: constant -ELBO)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return points


def curve_tags(runs: Sequence[Run], tags: Sequence[str]) -> list[str]:
    """The ``tags`` that some run has points of: the panels of the learning curves."""
    return [tag for tag in tags if any(run.series.get(tag) for run in runs)]


def learning_curves_figure(runs: Sequence[Run], tags: Sequence[str]):
    """One panel per tag that any run has, one style per run in every panel, and a legend
    below with one entry per run drawn; None when no run has any of ``tags``."""
    drawn = curve_tags(runs, tags)
    if not drawn:
        return None
    plt = _pyplot()
    columns = min(2, len(drawn))
    rows = math.ceil(len(drawn) / columns)
    width = 6.0 * columns
    fig, axes = plt.subplots(rows, columns, figsize=(width, 3.6 * rows), dpi=110, squeeze=False)
    # The style is fixed per run: each panel's own colour cycle would give a run that is
    # missing from one panel another run's colour there.
    styles = run_styles(len(runs))
    legend: dict[int, tuple[Any, str]] = {}  # run index -> (its first line, its legend label)
    for ax, tag in zip(axes.flat, drawn, strict=False):
        for index, (run, style) in enumerate(zip(runs, styles, strict=True)):
            if run.series.get(tag):
                steps, values = zip(*run.series[tag], strict=True)
                label = plot_label(run.label)
                (line,) = ax.plot(
                    steps,
                    values,
                    label=label,
                    color=style["color"],
                    linestyle=style["linestyle"],
                    marker=style["marker"] if len(steps) < 30 else None,
                    markersize=3,
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
        _legend_below(fig, handles, labels, width)
    return fig


def plot_learning_curves(runs: Sequence[Run], tags: Sequence[str], path: Path) -> list[str]:
    """Write :func:`learning_curves_figure` to ``path``; returns the tags drawn."""
    fig = learning_curves_figure(runs, tags)
    if fig is None:
        return []
    fig.savefig(path, bbox_inches="tight")
    _pyplot().close(fig)
    return curve_tags(runs, tags)
