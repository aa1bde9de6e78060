"""`vae-compare LOGDIR [LOGDIR ...]`: one table and one pair of figures per group of comparable
runs, with the config keys that differ inside the group and the final metrics.

    vae-compare logs/beta_sweep
    vae-compare logs --metrics val/elbo,val/kl,test/nll_iw --out reports/all

Every run under the given folders is found (a run is a folder with TensorBoard event files or
a ``metrics.json``; multirun jobs included). Final scalars are read with TensorBoard's own
``EventAccumulator`` (the last value of each tag), completed by ``metrics.json``; each run's
config comes from its ``.hydra/config.yaml`` (interpolations resolved, see
:func:`resolved_config`) and ``.hydra/overrides.yaml``. A run whose files cannot be read (a
``metrics.json`` that is not a JSON object, a corrupt config, unreadable event files) is left out
with a note that says why; the others are compared.

Runs are grouped by their run name (``--group-by name``: the experiment preset's name, or
``<model>_<data>`` by default; the folder under ``logs/``), so that a β sweep on digits, a VQ-VAE
and a Fashion-MNIST run never share a table or an axis. Inside a group the table shows the keys
that differ (resolved; keys set on the command line first; at most MAX_KEY_COLUMNS, the others
named below it) and names each run by them in the figures. Written to ``--out`` for each group
(in ``--out`` itself when there is one group, else in ``--out/<group>/``):

* ``runs.csv`` (every differing key, and each run's path) and ``runs.md`` (the printed table);
* ``rate_distortion.png``: KL (rate) against reconstruction NLL (distortion), one point per run,
  both in nats per example;
* ``learning_curves.png``: the chosen tags against the training step, one line per run.

With several groups, ``--out`` also holds ``runs.csv`` of all runs (with a ``group`` column),
``runs.md`` with every group's table, and ``rate_distortion.png`` with one panel per group.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.compare_plots import (
    plot_learning_curves,
    plot_rate_distortion,
    plot_rate_distortion_panels,
)

DEFAULT_METRICS = (
    "val/elbo",
    "val/recon",
    "val/kl",
    "val/bits_per_dim",
    "val/active_units",
    "val/mutual_info",
    "val/perplexity",
    "val/codebook_usage",
    "test/nll_iw",
    "test/nll_per_token",
    "test/elbo",
    "test/mutual_info",
    "test/label_kl",
    "test/label_kl_reverse",
    "test/classifier_score",
)
DEFAULT_CURVES = ("train/loss", "val/elbo", "val/kl", "val/recon")
# Runs with the same run name (`name`: the experiment preset's, else ${choice:model}_${choice:data})
# are compared with each other. A run whose config has none of the --group-by keys is grouped by
# its model and data classes.
DEFAULT_GROUP_BY = ("name",)
FALLBACK_GROUP_KEYS = ("model._target_", "data._target_")
# Config keys that differ between runs without saying anything about the experiment: the groups
# vae-train leaves out of the HParams record (vae.training.tensorboard.HPARAMS_IGNORED), and these.
IGNORED_KEYS = frozenset({"trainer.default_root_dir", "ckpt_path"})
# The printed table shows at most this many differing keys (runs.csv has them all), and cuts any
# cell longer than TEXT_CELL_WIDTH characters in the middle. After the keys set on the command
# line, keys are ordered by these sections, then alphabetically.
MAX_KEY_COLUMNS = 6
TEXT_CELL_WIDTH = 32
KEY_SECTIONS = ("model", "data", "trainer")
EVENT_FILE_PREFIX = "events.out.tfevents"
METRICS_FILE = "metrics.json"
SKIPPED_FOLDERS = frozenset({"checkpoints", ".hydra", "comparison"})
MISSING = "-"

# Interpolations in a saved config. ${choice:GROUP} is vae-train's run name, answered from the
# run's own .hydra/hydra.yaml. Any other resolver call (${now:...}, ${hydra:...}, ${run_id:}) gave
# its value when the run started and would give another one now: its text is kept as written.
CHOICE = re.compile(r"\$\{choice:([\w/]+)\}")
RESOLVER_CALL = re.compile(r"\$\{\s*[\w.\-]+\s*:")
# vae-train's run folders: <date>_<time>_<id>[_<overrides>], multirun_<date>_<time>_<id>, and the
# jobs of a multirun <number>[_<overrides>]; a table names a run by the <id> and job number only.
RUN_FOLDER = re.compile(
    r"(?:multirun_)?\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_(?P<short>[0-9a-f]{6})(?:_.*)?"
)
JOB_FOLDER = re.compile(r"(?P<short>\d+)(?:_.*)?")


class CompareError(ValueError):
    """vae-compare cannot produce a table; the message says why."""


class UnreadableRunError(ValueError):
    """One run's files cannot be read; the run is left out and the message says why."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # flattened, interpolations resolved
    overrides: list[str] = field(default_factory=list)
    aliases: set[str] = field(default_factory=set)  # keys whose saved value is ${another.key}
    final: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    name: str = ""  # the folder below the one common to all compared runs (notes)
    group: str = ""
    table_name: str = ""  # in its group's table: short, see table_names
    label: str = ""  # in its group's figures: the differing keys, key=value, ...


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


def _map_strings(node: Any, function) -> Any:
    """``node`` (nested dicts and lists) with ``function`` applied to every string in it."""
    if isinstance(node, dict):
        return {key: _map_strings(value, function) for key, value in node.items()}
    if isinstance(node, list):
        return [_map_strings(value, function) for value in node]
    return function(node) if isinstance(node, str) else node


def resolved_config(
    container: dict[str, Any], choices: dict[str, Any]
) -> tuple[dict[str, Any], set[str]]:
    """(the flattened config with its interpolations resolved, the keys that are aliases).

    ``${model.code_dim}`` becomes the value of ``model.code_dim``, ``${choice:model}`` the group
    option in ``choices`` (the run's ``hydra.runtime.choices``). Resolver calls are not made
    (their values belonged to the start of the run): such a value, and any key whose value cannot
    be resolved, keeps its text as written. An alias is a key whose whole saved value is a
    reference to another key (``model.encoder.arch: ${model.arch}``).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from vae.training.tensorboard import flatten_config, is_copy

    def literal(text: str) -> str:
        text = CHOICE.sub(lambda m: str(choices.get(m.group(1), m.group(0))), text)
        return text.replace("${", "\\${") if RESOLVER_CALL.search(text) else text

    container = _map_strings(container, literal)
    config = OmegaConf.create(container)
    resolved, aliases = {}, set()
    for key, value in flatten_config(container).items():
        if isinstance(value, str) and "${" in value:
            if is_copy(value):
                aliases.add(key)
            try:
                node = OmegaConf.select(config, key, throw_on_resolution_failure=True)
                if OmegaConf.is_config(node):
                    node = OmegaConf.to_container(node, resolve=True)
            except (OmegaConfBaseException, ValueError):  # a missing key, a bad interpolation
                node = value.replace("\\${", "${")
            # As flatten_config writes values: None and lists as their text.
            value = node if isinstance(node, (bool, int, float, str)) else str(node)
        resolved[key] = value
    return resolved, aliases


def _saved_choices(run_dir: Path) -> dict[str, Any]:
    """The run's config group options (``hydra.runtime.choices`` in ``.hydra/hydra.yaml``)."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    choices = _load_yaml(hydra_file, run_dir) if hydra_file.is_file() else {}
    for key in ("hydra", "runtime", "choices"):
        choices = choices.get(key) if isinstance(choices, dict) else None
    return choices if isinstance(choices, dict) else {}


def read_config(run_dir: Path) -> tuple[dict[str, Any], list[str], set[str]]:
    """(flattened resolved config, the overrides, the alias keys) of a run; empty where the
    files are missing.

    Raises UnreadableRunError for a file that is not YAML or does not hold the expected kind.
    """
    config: dict[str, Any] = {}
    aliases: set[str] = set()
    overrides: list[str] = []
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        container = _load_yaml(config_file, run_dir)
        if not isinstance(container, dict):
            raise UnreadableRunError(
                f".hydra/config.yaml holds {_kind(container)}, not a mapping of config keys"
            )
        choices = _saved_choices(run_dir) if CHOICE.search(str(container)) else {}
        config, aliases = resolved_config(container, choices)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        saved = _load_yaml(overrides_file, run_dir)
        if saved is not None and not isinstance(saved, list):
            raise UnreadableRunError(
                f".hydra/overrides.yaml holds {_kind(saved)}, not a list of overrides"
            )
        overrides = [str(o) for o in saved or []]
    return config, overrides, aliases


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
    run.config, run.overrides, run.aliases = read_config(run_dir)
    saved = read_metrics_file(run_dir)
    if saved.get("fast_dev_run"):  # one batch of each loop: a smoke test, not a result
        raise UnreadableRunError("a debug=fdr run, one batch of each loop: not a result")
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


# --- groups, keys and names ---------------------------------------------------------------------
def _common_folder(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent


def _group_value(key: str, value: Any) -> str:
    """A config value as part of a group name: a class path by its class name."""
    return str(value).rsplit(".", 1)[-1] if key.endswith("_target_") else str(value)


def group_name(run: Run, group_by: Sequence[str]) -> str:
    """The group of ``run``: its values of the ``group_by`` keys, joined by ``_``; without any
    of them, its model and data classes; "" when ``group_by`` is empty (one group)."""
    if not group_by:
        return ""
    for keys in (group_by, FALLBACK_GROUP_KEYS):
        parts = [_group_value(k, run.config[k]) for k in keys if run.config.get(k) is not None]
        if parts:
            return "_".join(parts)
    return "no_config" if not run.config else "other"


def group_runs(runs: Sequence[Run], group_by: Sequence[str]) -> dict[str, list[Run]]:
    """``{group name: its runs}``, groups sorted by name; sets each ``run.group``."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        run.group = group_name(run, group_by)
        groups.setdefault(run.group, []).append(run)
    return dict(sorted(groups.items()))


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (absent counts as a value).

    Runs without a saved config do not take part. Left out: keys about where files go and how
    runs are logged, and aliases (a key that is ``${another.key}`` in every run that has it:
    that other key is the one to show).
    """
    from vae.training.tensorboard import HPARAMS_IGNORED

    runs = [run for run in runs if run.config]
    keys = sorted({k for run in runs for k in run.config})
    ignored = tuple(f"{group}." for group in HPARAMS_IGNORED)
    keys = [k for k in keys if not k.startswith(ignored) and k not in IGNORED_KEYS]
    keys = [k for k in keys if not all(k in run.aliases for run in runs if k in run.config)]
    return [k for k in keys if len({repr(run.config.get(k, MISSING)) for run in runs}) > 1]


def order_keys(keys: Sequence[str], runs: Sequence[Run]) -> list[str]:
    """``keys`` in the order a reader looks for them: those set on the command line first (the
    key set in most runs first: a sweep's key before a single run's change), then model.*,
    data.*, trainer.* and the rest, each alphabetically."""
    from vae.training.config import split_override

    given: dict[str, int] = {}  # key -> runs that set it, in the order first seen
    for run in runs:
        for override in run.overrides:
            key = split_override(override)[1]
            if key in keys:
                given[key] = given.get(key, 0) + 1

    def section(key: str) -> int:
        first = key.split(".", 1)[0]
        return KEY_SECTIONS.index(first) if first in KEY_SECTIONS else len(KEY_SECTIONS)

    return sorted(given, key=lambda k: -given[k]) + sorted(
        set(keys) - set(given), key=lambda k: (section(k), k)
    )


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``model.beta`` -> ``beta`` where the last component is unique among ``keys``.

    ``model._target_`` stays whole: matplotlib hides legend labels that start with ``_``.
    """
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {
        k: (s if last.count(s) == 1 and not s.startswith("_") else k)
        for k, s in zip(keys, last, strict=True)
    }


def table_names(paths: Sequence[Path]) -> list[str]:
    """Names for runs in one table: each folder below the folder common to ``paths``, where
    vae-train's folder names are cut to their random id and job number (``de338f/0``): the time
    is not needed to tell runs apart, and the overrides are in the key columns. The whole
    relative paths where the short names are not unique."""
    common = _common_folder(paths)
    whole, short = [], []
    for path in paths:
        parts = path.relative_to(common).parts or (path.name,)
        names = []
        for index, part in enumerate(parts):
            in_multirun = (common / Path(*parts[:index])).name.startswith("multirun_")
            match = RUN_FOLDER.fullmatch(part) or (in_multirun and JOB_FOLDER.fullmatch(part))
            names.append(match["short"] if match else part)
        whole.append("/".join(parts))
        short.append("/".join(names))
    return short if len(set(short)) == len(short) else whole


def name_runs(runs: Sequence[Run], keys: Sequence[str]) -> None:
    """Each run's table name and its label in the figures: ``short key=value`` for ``keys``
    (the table name too where two runs would have the same label)."""
    short = short_names(keys)
    for run, name in zip(runs, table_names([run.path for run in runs]), strict=True):
        run.table_name = name
        run.label = ", ".join(f"{short[k]}={format_value(run.config.get(k))}" for k in keys)
    labels = [run.label for run in runs]
    for run in runs:
        if not run.label or labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.table_name})" if run.label else run.table_name


def _sort_key(run: Run, keys: Sequence[str]) -> tuple:
    """Rows in the order of their key values (numbers as numbers), then by folder."""
    values = []
    for key in keys:
        value = run.config.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        values.append((0, value, "") if number else (1, 0, str(value)))
    return (*values, str(run.path))


# --- tables -------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def build_table(runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str]):
    """(header, rows) with one row per run: its table name, the keys, the metrics."""
    header = ["run", *keys, *metrics]
    rows = [
        [run.table_name, *(run.config.get(k) for k in keys), *(run.final.get(m) for m in metrics)]
        for run in runs
    ]
    return header, rows


def _cut(text: str, width: int = TEXT_CELL_WIDTH) -> str:
    """``text`` cut in the middle to ``width`` characters (both ends tell values apart)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cut(c) for c in header]] + [[_cut(format_value(v)) for v in row] for row in rows]
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


# --- one group ----------------------------------------------------------------------------------
@dataclass
class GroupReport:
    name: str
    runs: list[Run]
    keys: list[str]  # every differing key, in order; the table shows the first MAX_KEY_COLUMNS
    metrics: list[str]
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def shown_keys(self) -> list[str]:
        return self.keys[:MAX_KEY_COLUMNS]

    def table(self) -> tuple[list[str], list[list[Any]]]:
        return build_table(self.runs, self.shown_keys, self.metrics)

    def text(self) -> str:
        """The printed table, and below it the differing keys it leaves out."""
        text = text_table(*self.table())
        hidden = self.keys[MAX_KEY_COLUMNS:]
        if hidden:
            more = f" and {len(hidden) - 6} more" if len(hidden) > 6 else ""
            text += f"\nalso differ (in runs.csv): {', '.join(hidden[:6])}{more}"
        return text

    def heading(self) -> str:
        """``NAME: N runs of MODEL on DATA in FOLDER``, the classes where the group has one."""
        what = ""
        for key, word in zip(FALLBACK_GROUP_KEYS, (" of ", " on "), strict=True):
            values = {run.config.get(key) for run in self.runs}
            if len(values) == 1 and None not in values:
                what += word + _group_value(key, values.pop())
        folder = _shown_path(_common_folder([run.path for run in self.runs]))
        return f"{self.name}: {_count(len(self.runs), 'run')}{what} in {folder}"


def report_group(name: str, runs: Sequence[Run], metrics: Sequence[str] | None) -> GroupReport:
    """The keys, names and metric columns of one group of runs, rows in key order."""
    keys = order_keys(differing_keys(runs), runs)
    runs = sorted(runs, key=lambda run: _sort_key(run, keys))
    name_runs(runs, keys[:MAX_KEY_COLUMNS])
    if metrics is None:  # the defaults that any run of the group has
        metrics = [m for m in DEFAULT_METRICS if any(m in run.final for run in runs)]
    return GroupReport(name, list(runs), keys, list(metrics))


def write_group(
    group: GroupReport, out_dir: Path, rate: str, distortion: str, curves: Sequence[str]
) -> None:
    """runs.csv (every differing key, and the paths), runs.md and the two figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(group.runs, group.keys, group.metrics)
    paths = [_shown_path(run.path) for run in group.runs]
    write_csv(
        out_dir / "runs.csv",
        [*header, "path"],
        [[*row, path] for row, path in zip(rows, paths, strict=True)],
    )
    (out_dir / "runs.md").write_text(markdown_table(*group.table()))
    group.written += [out_dir / "runs.csv", out_dir / "runs.md"]
    if plot_rate_distortion(group.runs, rate, distortion, out_dir / "rate_distortion.png"):
        group.written.append(out_dir / "rate_distortion.png")
    else:
        group.notes.append(
            f"rate_distortion.png not written: no run has both {rate} and {distortion}."
        )
    if plot_learning_curves(group.runs, curves, out_dir / "learning_curves.png"):
        group.written.append(out_dir / "learning_curves.png")
    else:
        group.notes.append(
            f"learning_curves.png not written: no run has any of {', '.join(curves)}."
        )


def _folder_names(names: Sequence[str]) -> list[str]:
    """A folder name for each group: its name with only [A-Za-z0-9_.-] kept, made unique."""
    folders: list[str] = []
    for name in names:
        folder = re.sub(r"[^\w.\-]+", "_", name).strip("._") or "group"
        while folder in folders:
            folder += "_"
        folders.append(folder)
    return folders


def write_overview(groups: Sequence[GroupReport], out_dir: Path, rate: str, distortion: str):
    """Several groups: runs.csv of all runs (with their group), runs.md with each group's
    table under its heading, rate_distortion.png with a panel per group; returns the paths."""
    keys = list(dict.fromkeys(k for group in groups for k in group.keys))
    metrics = list(dict.fromkeys(m for group in groups for m in group.metrics))
    header = ["group", "run", *keys, *metrics, "path"]
    rows = [
        [group.name, *build_table([run], keys, metrics)[1][0], _shown_path(run.path)]
        for group in groups
        for run in group.runs
    ]
    write_csv(out_dir / "runs.csv", header, rows)
    sections = [f"## {group.heading()}\n\n{markdown_table(*group.table())}" for group in groups]
    (out_dir / "runs.md").write_text("\n".join(sections))
    written = [out_dir / "runs.csv", out_dir / "runs.md"]
    panels = {group.name: group.runs for group in groups}
    if plot_rate_distortion_panels(panels, rate, distortion, out_dir / "rate_distortion.png"):
        written.append(out_dir / "rate_distortion.png")
    return written


# --- the command --------------------------------------------------------------------------------
def metric_notes(groups: Sequence[GroupReport], explicit: bool) -> list[str]:
    """Where a metric column of a group is empty for some runs (those with any metric)."""
    notes = []
    columns = list(dict.fromkeys(m for group in groups for m in group.metrics))
    for metric in columns:
        among = [r for g in groups if metric in g.metrics for r in g.runs if r.final]
        lacking = [run.name for run in among if metric not in run.final]
        if lacking and (explicit or len(lacking) < len(among)):
            where = "any run" if len(lacking) == len(among) else ", ".join(lacking)
            notes.append(f"{metric} is missing in {where}.")
    return notes


def compare(
    logdirs: Sequence[str],
    metrics: Sequence[str] | None = None,
    out: str | os.PathLike = "comparison",
    rate: str = "val/kl",
    distortion: str = "val/recon",
    curves: Sequence[str] = DEFAULT_CURVES,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
) -> dict[str, Any]:
    """Find, read, group, tabulate and plot; return what was written and what was missing."""
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
    common = _common_folder([run.path for run in runs])
    for run in runs:
        run.name = str(run.path.relative_to(common)) if run.path != common else run.path.name
    notes = [f"skipped {why}" for why in unreadable]
    for run in runs:
        if not run.config:
            notes.append(f"{run.name}: no .hydra/config.yaml, so its config is not compared.")
        if not run.final:
            notes.append(
                f"{run.name}: no metrics (no scalars in its event files and no metrics.json); "
                "did it stop before its first validation?"
            )
    if group_by and not any(key in run.config for run in runs for key in group_by):
        notes.append(
            f"--group-by {','.join(group_by)}: no run's config has it; grouped by model and data "
            "class instead."
        )
    groups = [report_group(n, rs, metrics) for n, rs in group_runs(runs, group_by).items()]
    notes += metric_notes(groups, explicit=metrics is not None)

    out_dir = Path(out)
    single = len(groups) == 1
    folders = [""] if single else _folder_names([group.name for group in groups])
    for group, folder in zip(groups, folders, strict=True):
        write_group(group, out_dir / folder, rate, distortion, curves)
        notes += [note if single else f"{group.name}: {note}" for note in group.notes]
    if single:
        (group,) = groups
        table, written = group.text(), group.written
        header, rows = group.table()
    else:
        written = write_overview(groups, out_dir, rate, distortion)
        written += [out_dir / folder for folder in folders]
        table = "\n\n".join(f"== {group.heading()}\n{group.text()}" for group in groups) + "\n"
        header, rows = [], []
    return {
        "table": table,
        "header": header,
        "rows": rows,
        "written": written,
        "notes": notes,
        "runs": [run for group in groups for run in group.runs],
        "groups": groups,
    }


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _group_keys(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else _comma_list(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-compare",
        description="Table and plots of the runs under LOGDIR(s), one per group of comparable "
        "runs: the config keys that differ inside the group and the final metrics.",
    )
    parser.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="folders to search for runs")
    parser.add_argument(
        "--metrics",
        type=_comma_list,
        default=None,
        help="comma-separated tags for the table (default: common val/ and test/ tags)",
    )
    parser.add_argument(
        "--out",
        default="comparison",
        help="folder for runs.csv, runs.md and the PNGs (a subfolder per group if several)",
    )
    parser.add_argument("--rate", default="val/kl", help="x axis of rate_distortion.png")
    parser.add_argument("--distortion", default="val/recon", help="y axis of rate_distortion.png")
    parser.add_argument(
        "--curves",
        type=_comma_list,
        default=list(DEFAULT_CURVES),
        help="comma-separated tags for learning_curves.png",
    )
    parser.add_argument(
        "--group-by",
        type=_group_keys,
        default=list(DEFAULT_GROUP_BY),
        metavar="KEYS",
        help="comma-separated config keys: runs that share their values are compared together "
        "(default: name, the run name: experiment, or model_data); 'none': all runs in one table",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = compare(
            args.logdirs,
            args.metrics,
            args.out,
            args.rate,
            args.distortion,
            args.curves,
            args.group_by,
        )
    except CompareError as err:
        print(f"vae-compare: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result["table"])
    for note in result["notes"]:
        print(f"vae-compare: note: {note}", file=sys.stderr)
    runs = _count(len(result["runs"]), "run")
    if len(result["groups"]) == 1:
        print(f"{runs}; wrote " + ", ".join(str(path) for path in result["written"]))
    else:  # the group folders are named in the headings
        files = [path.name for path in result["written"] if path.is_file()]
        print(
            f"{runs} in {len(result['groups'])} groups; wrote in {args.out}: "
            + ", ".join(files)
            + " and a folder per group"
        )


if __name__ == "__main__":
    main()
