"""Metrics that need a model: IW-NLL, active units, codebook statistics, sample scores.

Plain functions, usable without Lightning or Hydra; ``vae-eval`` (``experiments/evaluate.py``)
wires them to a run directory. Units: nats per example unless a name says otherwise.
"""

from vae.eval.active_units import (
    ACTIVE_UNIT_THRESHOLD,
    active_units,
    count_active_units,
)
from vae.eval.epoch_statistics import (
    ActiveUnits,
    CodeUsage,
    CodeUsageResult,
    KLDecompositionMetric,
    KLPerDimension,
)
from vae.eval.nll import (
    ImportanceWeightedBounds,
    diagonal_gaussian_log_density,
    importance_weighted_bounds,
    importance_weighted_nll,
    standard_normal_log_density,
)
from vae.eval.sample_scores import (
    ClassifierSettings,
    SampleClassifier,
    classifier_score,
    fid_unavailable_reason,
    label_histogram,
    label_kl,
    load_or_train_classifier,
    predict_probabilities,
    predicted_label_histogram,
    reverse_label_kl,
    train_classifier,
)

__all__ = [
    "ActiveUnits",
    "CodeUsage",
    "CodeUsageResult",
    "KLDecompositionMetric",
    "KLPerDimension",
    "ACTIVE_UNIT_THRESHOLD",
    "ClassifierSettings",
    "ImportanceWeightedBounds",
    "SampleClassifier",
    "active_units",
    "classifier_score",
    "count_active_units",
    "diagonal_gaussian_log_density",
    "fid_unavailable_reason",
    "importance_weighted_bounds",
    "importance_weighted_nll",
    "label_histogram",
    "label_kl",
    "load_or_train_classifier",
    "predict_probabilities",
    "predicted_label_histogram",
    "reverse_label_kl",
    "standard_normal_log_density",
    "train_classifier",
]
