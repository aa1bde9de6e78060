"""Run directories and the files in them: ``metrics.json`` and the saved Hydra config."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
CONFIG_FILE = Path(".hydra") / "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping them
    return value


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_metrics(
    run_dir: str | os.PathLike, metrics: Mapping[str, Any], merge: bool = True
) -> Path:
    """Write ``metrics.json`` atomically (temp file + rename), merging with what is there.

    Keys are TensorBoard tag names (``val/elbo``, ``test/nll_iw``) plus run-level numbers such
    as ``train_samples_per_s``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    merged = read_metrics(run_dir) if merge else {}
    merged.update({key: _jsonable(value) for key, value in metrics.items()})
    path = run_dir / METRICS_FILE
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".metrics.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(dict(sorted(merged.items())), handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return path
