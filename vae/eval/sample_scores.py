"""Sample quality measured with KL divergences, through a small classifier of the dataset.

A classifier p(y|x) is trained once per dataset (and settings) on the real training images and
cached under ``paths.cache_dir``. On N generated samples x_1..x_N, with h_gen the histogram of
the predicted labels argmax_y p(y|x_i) and h_data the label histogram of the real split, it
gives:

* ``label_kl`` = KL( h_gen || h_data ): 0 when the histograms are equal. It weights each class
  by how often the model generates it, so it sees over-generation (+inf for a generated class
  that the split does not have). A class the model never generates costs only through the mass moved
  to the others: dropping one of 10 balanced classes and generating the other 9 equally often
  gives log(10/9) = 0.105 nats, and generating a single class y gives log(1 / h_data(y))
  (log 10 = 2.30 nats for 10 balanced classes).
* ``reverse_label_kl`` = KL( h_data || h_gen ): the direction that sees dropped modes. It is
  +inf when some class of the split is never a predicted label among the samples, and large
  when a class is generated much less often than the data has it. Even a generator that
  matches the data misses a class of predicted-label frequency p among N samples with
  probability (1 - p)^N (1.7e-46 for p = 0.1, N = 1000), so a small N can give +inf by chance.
* ``classifier_score`` = exp( E_x KL( p(y|x) || p(y) ) ), p(y) = (1/N) sum_i p(y|x_i): the
  Inception-Score analogue (Salimans et al. 2016), exp of the mutual information between the
  sample and its label, so it lies in [1, C] for C classes. It is 1 when every sample has the
  same p(y|x) (all alike, or all equally ambiguous) and C exactly when every sample is
  classified with certainty and the classes are balanced. The same score of the real test
  images is a reference, not a ceiling: samples that the classifier labels more confidently
  than it labels real images, in balanced classes, can score above them (up to C).

Both label KLs use counts of predicted labels, not the mean of p(y|x) over the samples: that
mean is almost never exactly 0 for any class, so a reverse KL from it would stay finite when a
class is never generated. All KLs are in nats and come from :func:`vae.losses.categorical_kl`,
exact, with no epsilon. FID needs Inception weights that are not shipped;
:func:`fid_unavailable_reason` says whether they are on this machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.losses import categorical_kl

__all__ = [
    "ClassifierSettings",
    "SampleClassifier",
    "classifier_cache_path",
    "classifier_score",
    "fid_unavailable_reason",
    "label_histogram",
    "label_kl",
    "load_or_train_classifier",
    "predict_probabilities",
    "predicted_label_histogram",
    "reverse_label_kl",
    "train_classifier",
]


@dataclass(frozen=True)
class ClassifierSettings:
    """How the scoring classifier is trained; part of its cache key."""

    hidden_dim: int = 256
    steps: int = 2000  # optimizer steps, whatever the dataset size (~4.7 epochs of Fashion-MNIST)
    batch_size: int = 128
    lr: float = 1.0e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("hidden_dim", "steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"eval.classifier.{key} must be a positive integer, got {value!r}."
                )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"eval.classifier.lr must be a positive number, got {self.lr!r}.")


class SampleClassifier(nn.Module):
    """A one-hidden-layer MLP p(y|x) on images of shape (C, H, W); returns logits (B, classes)."""

    def __init__(self, image_shape: tuple[int, ...], num_classes: int, hidden_dim: int = 256):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(self.image_shape), hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _fingerprint(images: Tensor, labels: Tensor) -> str:
    """A hash of the training data, so that two datasets that share a name never share a cache."""
    digest = hashlib.sha1()
    digest.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().long().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def classifier_cache_path(
    cache_dir: str | Path,
    dataset_name: str,
    images: Tensor,
    labels: Tensor,
    settings: ClassifierSettings,
) -> Path:
    """``<cache_dir>/sample_classifier/<dataset>-<hash>.pt``; the hash covers data and settings."""
    key = json.dumps(
        {
            "settings": asdict(settings),
            "shape": list(images.shape),
            "data": _fingerprint(images, labels),
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / "sample_classifier" / f"{dataset_name}-{digest}.pt"


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, settings: ClassifierSettings
) -> SampleClassifier:
    """Fit :class:`SampleClassifier` with Adam on (images, labels) for ``settings.steps`` steps.

    Minibatches walk through seeded random permutations of the data, epoch after epoch.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"images and labels must be non-empty and of the same length, got {images.shape[0]} "
            f"and {labels.shape[0]}."
        )
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        classifier = SampleClassifier(tuple(images.shape[1:]), num_classes, settings.hidden_dim)
    classifier = classifier.to(images.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=settings.lr)
    classifier.train()
    step = 0
    while step < settings.steps:
        order = torch.randperm(images.shape[0], generator=generator).to(images.device)
        for start in range(0, order.numel(), settings.batch_size):
            index = order[start : start + settings.batch_size]
            loss = F.cross_entropy(classifier(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == settings.steps:
                break
    return classifier.eval()


def load_or_train_classifier(
    cache_dir: str | Path,
    dataset_name: str,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    settings: ClassifierSettings | None = None,
) -> tuple[SampleClassifier, Path, bool]:
    """(classifier, cache file, whether it was trained now) for this dataset and settings.

    The first call trains and saves; later calls with the same data and settings load the file.
    """
    settings = settings or ClassifierSettings()
    path = classifier_cache_path(cache_dir, dataset_name, images, labels, settings)
    classifier = SampleClassifier(tuple(images.shape[1:]), num_classes, settings.hidden_dim)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            classifier.load_state_dict(saved["state_dict"])
            return classifier.to(images.device).eval(), path, False
        except Exception:  # a truncated or stale file is rebuilt rather than trusted
            pass
    classifier = train_classifier(images, labels, num_classes, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.cpu() for k, v in classifier.state_dict().items()}
    torch.save({"state_dict": state, "settings": asdict(settings), "dataset": dataset_name}, tmp)
    tmp.replace(path)
    return classifier, path, True


@torch.no_grad()
def predict_probabilities(classifier: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    """p(y|x) for every image, (N, classes), float64 rows summing to 1."""
    classifier.eval()
    parts = [
        torch.softmax(classifier(images[i : i + batch_size]).double(), dim=-1)
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(parts)


def label_histogram(labels: Tensor, num_classes: int) -> Tensor:
    """Relative frequency of each class in ``labels`` (N,), float64 (classes,)."""
    if labels.numel() == 0:
        raise ValueError("labels is empty; a label histogram needs at least one label.")
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes).double()
    if counts.numel() != num_classes:
        raise ValueError(f"labels go up to {counts.numel() - 1}, beyond num_classes={num_classes}.")
    return counts / counts.sum()


def predicted_label_histogram(sample_probabilities: Tensor) -> Tensor:
    """h_gen: relative frequency of argmax_y p(y|x_i) over the samples, float64 (classes,).

    Args:
        sample_probabilities: p(y|x_i) of the generated samples, (N, classes), N >= 1.
    """
    if sample_probabilities.dim() != 2:
        raise ValueError(
            "sample_probabilities must have shape (num_samples, num_classes), got "
            f"{tuple(sample_probabilities.shape)}."
        )
    return label_histogram(sample_probabilities.argmax(-1), sample_probabilities.shape[-1])


def label_kl(sample_probabilities: Tensor, data_labels: Tensor) -> Tensor:
    """KL(h_gen || h_data) = sum_y h_gen(y) log(h_gen(y) / h_data(y)), in nats.

    h_gen is the histogram of the samples' predicted labels (:func:`predicted_label_histogram`),
    h_data that of ``data_labels``. It measures over-generation: +inf if a class absent from
    ``data_labels`` is predicted for some sample, while a class never predicted adds no term
    (dropping one of 10 balanced classes, the rest uniform, gives only log(10/9) = 0.105 nats);
    :func:`reverse_label_kl` is the direction that sees that.

    Args:
        sample_probabilities: p(y|x_i) of the generated samples, (N, classes).
        data_labels: the real labels of the reference split, (M,).
    """
    generated = predicted_label_histogram(sample_probabilities)
    return categorical_kl(generated, label_histogram(data_labels, generated.numel()))


def reverse_label_kl(sample_probabilities: Tensor, data_labels: Tensor) -> Tensor:
    """KL(h_data || h_gen) = sum_y h_data(y) log(h_data(y) / h_gen(y)), in nats.

    The same histograms as :func:`label_kl`, the other direction: it measures dropped modes.
    +inf exactly when a class present in ``data_labels`` is never the predicted label of a
    sample (no epsilon: :func:`vae.losses.categorical_kl` gives +inf where h_gen(y) = 0 <
    h_data(y)); a class generated too rarely costs h_data(y) log(h_data(y) / h_gen(y)).

    Args:
        sample_probabilities: p(y|x_i) of the generated samples, (N, classes).
        data_labels: the real labels of the reference split, (M,).
    """
    generated = predicted_label_histogram(sample_probabilities)
    return categorical_kl(label_histogram(data_labels, generated.numel()), generated)


def classifier_score(probabilities: Tensor) -> Tensor:
    """exp( mean_i KL( p(y|x_i) || p(y) ) ) with p(y) the mean of the rows; (N, classes) -> ()."""
    if probabilities.dim() != 2 or probabilities.shape[0] == 0:
        raise ValueError(
            f"probabilities must have shape (num_samples, num_classes), got {tuple(probabilities.shape)}."
        )
    marginal = probabilities.mean(0, keepdim=True)
    return torch.exp(categorical_kl(probabilities, marginal).mean())


# torch-fidelity keeps its Inception weights in torch.hub's checkpoint folder under this name.
FID_WEIGHT_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)


def fid_unavailable_reason() -> str | None:
    """None when FID can be computed offline here; otherwise the one-line reason it is skipped."""
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: F401
    except ImportError:
        return "FID skipped: torchmetrics with torch-fidelity is not installed."
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not any((checkpoints / name).is_file() for name in FID_WEIGHT_FILES):
        return (
            f"FID skipped: no Inception weights in {checkpoints} (they cannot be downloaded here)."
        )
    return None


@torch.no_grad()
def frechet_inception_distance(samples: Tensor, reference: Tensor, batch_size: int = 256) -> float:
    """FID (Heusel et al. 2017) between two image sets in [0, 1], with torchmetrics' Inception.

    Protocol: 2048-d pool features of Inception-v3 (the torch-fidelity weights), grey images
    repeated to 3 channels, images resized by torchmetrics to 299 x 299; the caller picks the
    sets (``vae-eval`` uses ``eval.num_samples`` samples against the whole test split).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True).to(samples.device)
    for images, real in ((reference, True), (samples, False)):
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size].clamp(0, 1)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            metric.update(batch, real=real)
    return float(metric.compute())
