"""The test-split numbers of one model, as a ``{tag: value}`` dict (tags from :mod:`vae.training.tags`).

Plain functions over in-memory batches: ``vae-eval`` calls them, and so can a notebook.

* :func:`gaussian_vae_metrics`: ELBO, IW-NLL, bits/dim, active units, KL (total and per dim).
* :func:`sample_score_metrics`: label KL and classifier score of generated samples.
* :func:`vqvae_metrics` / :func:`vqvae_prior_metrics`: reconstruction MSE, perplexity and
  codebook usage over the whole split; the prior's bits/dim.
* :func:`text_lm_metrics`: a language model's exact NLL per sentence and perplexity per token.
* :func:`evaluate_split`: the one that fits the model (:func:`evaluation_inputs` gives it the
  split); :func:`non_finite_metrics`: the numbers
  that must not be written into a run.

All likelihood terms are nats per example, averaged over the examples of the split.

**Several processes.** When a ``torch.distributed`` process group is running (``torchrun
--nproc_per_node=W --no-python vae-eval ...``), :func:`evaluate_split` gives each rank a
contiguous run of the split's batches (:func:`shard_of_batches`) and the sums, active-unit
moments and posteriors are gathered, so every rank returns the numbers one process computes
on the whole split. The importance samples of batch b are drawn from a stream seeded by
(``seed``, b) (:func:`batch_seed`), not by the position of b in a process's sequence, so the
draws do not depend on how the split is shared; only the order of the float64 sums does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vae.eval.epoch_statistics import ActiveUnits, KLDecompositionMetric
from vae.eval.nll import importance_weighted_bounds
from vae.eval.sample_scores import (
    classifier_score,
    label_kl,
    predict_probabilities,
    reverse_label_kl,
)
from vae.losses import codebook_usage, perplexity
from vae.training import tags

__all__ = [
    "batch_seed",
    "batches_of",
    "shard_of_batches",
    "gaussian_vae_metrics",
    "sample_score_metrics",
    "evaluation_inputs",
    "text_lm_metrics",
    "vqvae_metrics",
    "vqvae_prior_metrics",
    "evaluate_split",
    "non_finite_metrics",
]

Progress = Callable[[int], None]


def batches_of(images: Tensor, batch_size: int, device: torch.device | str | None = None):
    """Consecutive batches of ``images`` (N, ...), moved to ``device``."""
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size].to(device)


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``'s random draws: distinct for every (seed, batch) pair
    with seed < 2^31 and fewer than 2^32 batches."""
    return (int(seed) << 32) | int(batch_index)


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the running ``torch.distributed`` group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_of_batches(num_batches: int, rank: int, world_size: int) -> range:
    """The batches of ``rank``: a contiguous block, the first ``num_batches % world_size``
    ranks one batch longer, so that the ranks' blocks in rank order are the split in order."""
    if num_batches < world_size:
        raise ValueError(
            f"{num_batches} batches cannot be shared by {world_size} processes: use fewer "
            "processes or a smaller eval.batch_size."
        )
    base, extra = divmod(num_batches, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def seeded_batches(
    images: Tensor,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    generator: torch.Generator,
    batches: range,
):
    """Batches ``batches`` of ``images``; before each is yielded, ``generator`` and torch's
    global stream (a density's dequantization noise) are reseeded by :func:`batch_seed`."""
    for index in batches:
        generator.manual_seed(batch_seed(seed, index))
        torch.manual_seed(batch_seed(seed, index))
        yield images[index * batch_size : (index + 1) * batch_size].to(device)


class _Means:
    """Running float64 sums of per-example values, for split means weighted by example;
    :meth:`gather` adds up the sums of every process."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, Tensor] = {}

    def add(self, **values: Tensor) -> None:
        for name, value in values.items():
            total = value.detach().double().sum(0)
            self.sums[name] = self.sums[name] + total if name in self.sums else total

    def gather(self) -> None:
        if distributed_world()[1] == 1:
            return
        count = torch.tensor(float(self.count), dtype=torch.float64)
        dist.all_reduce(count)
        self.count = int(count)
        for name in sorted(self.sums):
            total = self.sums[name].cpu() if dist.get_backend() == "gloo" else self.sums[name]
            dist.all_reduce(total)
            self.sums[name] = total

    def mean(self, name: str) -> Tensor:
        return self.sums[name] / self.count


@torch.no_grad()
def gaussian_vae_metrics(
    model,
    batches: Iterable[Tensor],
    k: int,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Test metrics of a VAE over ``batches`` (the split), averaged per example.

    * ``test/nll_iw``: -L_k with k samples (Burda et al. 2016), an estimate whose expectation
      upper-bounds the NLL;
    * ``test/elbo``: -(recon + kl) with a k-sample reconstruction term;
    * ``test/recon``, ``test/kl``: exact for a Gaussian VAE, the mean over the k draws of
      log q(z|x) - log p(z) for a model with its own ``importance_sample`` (a VampPrior, a
      ladder VAE; see ``vae.eval.nll``); ``test/kl_per_dim`` (a list, nats per dimension) only
      where per-dimension values exist (the closed form against N(0, I));
    * ``test/bits_per_dim``: ``test/nll_iw`` / (pixels * ln 2), plus log2 L for a density on
      dequantized pixels; absent where no comparable figure exists (``_bits_per_dim``);
    * ``test/active_units``: dimensions with Var_x(E_q[z_d]) > 0.01, of ``model.encode(x)``'s
      mean;
    * ``test/mutual_info``, ``test/total_correlation``, ``test/dimwise_kl``: the KL
      decomposition (``vae.losses.decomposition``) with q(z) the whole split's aggregate
      posterior N(mu, diag exp(logvar)) from ``model.encode``, one seeded draw per example
      (10,000 at most); they add up to ``test/kl`` (without per-dimension KLs, the model's
      own KL is passed in, so the third term is KL(q(z) || p(z)) - TC). Left out for a model
      whose ``reports_kl_decomposition`` is False (its q(z|x) is not that of ``encode``);
    * ``test/num_examples`` and ``test/importance_samples`` (k), to state the protocol.
    """
    means = _Means()
    posterior_means = decomposition = None  # once the latent size is known
    decompose = getattr(model, "reports_kl_decomposition", True)
    gather = distributed_world()[1] > 1  # every process has at least one batch (shard_of_batches)
    for x in batches:
        bounds = importance_weighted_bounds(model, x, k, chunk_size, generator)
        means.count += x.shape[0]
        means.add(nll_iw=bounds.nll_iw, recon=bounds.recon, kl=bounds.kl)
        if bounds.kl_per_dim is not None:
            means.add(kl_per_dim=bounds.kl_per_dim)
        mu, logvar = model.encode(x)
        if posterior_means is None:  # gathered from every process of a shared evaluation
            posterior_means = ActiveUnits(mu.shape[1], sync_on_compute=gather).to(mu.device)
            decomposition = KLDecompositionMetric(
                mu.shape[1], num_points=10_000, sync_on_compute=gather
            ).to(mu.device)
        posterior_means.update(mu)
        if decompose:  # the closed-form KL against N(0, I) where it exists, else the model's
            decomposition.update(mu, logvar, None if bounds.kl_per_dim is not None else bounds.kl)
        if progress is not None:
            progress(means.count)
    if means.count == 0:
        raise ValueError("batches is empty: there is nothing to evaluate.")
    means.gather()
    per_dim = "kl_per_dim" in means.sums
    kl_per_dim = means.mean("kl_per_dim") if per_dim else None
    where_kl_goes = decomposition.compute() if decompose and means.count >= 2 else None
    recon, nll_iw = float(means.mean("recon")), float(means.mean("nll_iw"))
    kl = float(kl_per_dim.sum()) if per_dim else float(means.mean("kl"))
    return {
        tags.TEST_NLL_IW: nll_iw,
        tags.TEST_ELBO: -(recon + kl),
        tags.TEST_RECON: recon,
        tags.TEST_KL: kl,
        **({tags.TEST_KL_PER_DIM: kl_per_dim.tolist()} if per_dim else {}),
        **_bits_per_dim(model, nll_iw),
        tags.TEST_ACTIVE_UNITS: int(posterior_means.compute()),
        **(
            {
                tags.tag("test", name): float(getattr(where_kl_goes, name))
                for name in tags.KL_DECOMPOSITION
            }
            if where_kl_goes is not None
            else {}
        ),
        tags.TEST_NUM_EXAMPLES: means.count,
        tags.TEST_IMPORTANCE_SAMPLES: k,
    }


@torch.no_grad()
def sample_score_metrics(
    samples: Tensor, classifier, real_images: Tensor, real_labels: Tensor
) -> dict[str, float]:
    """Label KL and classifier score of ``samples``, with the classifier's figures on real data.

    * ``test/label_kl``: KL(h_gen || h_data), h_gen the histogram of the samples' predicted
      labels, h_data that of ``real_labels``, nats: sees over-generated classes;
    * ``test/label_kl_reverse``: KL(h_data || h_gen), nats: +inf when a class of
      ``real_labels`` is never predicted for a sample (a dropped mode);
    * ``test/classifier_score``: exp(E_x KL(p(y|x) || p(y))) of the samples, in [1, classes];
    * ``test/classifier_score_real``: the same score of ``real_images``, a reference, not a
      ceiling (samples can score above it);
    * ``test/classifier_accuracy``: the classifier's accuracy on ``real_images``, so a weak
      classifier is visible next to the scores it gives.
    """
    sample_probabilities = predict_probabilities(classifier, samples)
    real_probabilities = predict_probabilities(classifier, real_images)
    labels = real_labels.to(samples.device)
    accuracy = (real_probabilities.argmax(-1).cpu() == real_labels.cpu()).double().mean()
    return {
        tags.TEST_LABEL_KL: float(label_kl(sample_probabilities, labels)),
        tags.TEST_LABEL_KL_REVERSE: float(reverse_label_kl(sample_probabilities, labels)),
        tags.TEST_CLASSIFIER_SCORE: float(classifier_score(sample_probabilities)),
        tags.TEST_CLASSIFIER_SCORE_REAL: float(classifier_score(real_probabilities)),
        tags.TEST_CLASSIFIER_ACCURACY: float(accuracy),
        tags.TEST_NUM_SAMPLES: int(samples.shape[0]),
    }


@torch.no_grad()
def vqvae_metrics(
    model, batches: Iterable[Tensor], progress: Progress | None = None
) -> dict[str, Any]:
    """Test metrics of a VQ-VAE over the whole split.

    The model needs ``model(x) -> (decoder params, quantizer output with .indices)``,
    ``decoder_mean(params)``, ``reconstruction_nll(params, x) -> (B,)``, ``num_codes`` and
    ``rate`` (latent positions x log K nats: the KL against the uniform prior).

    * ``test/recon_mse``: mean over examples and pixels of (decoder mean - x)^2;
    * ``test/recon``: -log p(x | e), nats per example;
    * ``test/perplexity``: exp(H) of the code histogram of the *whole split* (not a mean of
      per-batch perplexities, which would understate the codes in use);
    * ``test/codebook_usage``: fraction of the K codes used at least once in the split;
    * ``test/kl``, ``test/elbo``, ``test/bits_per_dim``: with the uniform prior over codes, as
      in ``val/*``; a trained prior (``vqvae_prior_metrics``) gives the tighter numbers.
    """
    means = _Means()
    counts = None
    for x in batches:
        params, quantized = model(x)
        batch_counts = torch.bincount(quantized.indices.flatten(), minlength=model.num_codes)
        counts = batch_counts if counts is None else counts + batch_counts
        means.count += x.shape[0]
        means.add(
            squared_error=(model.decoder_mean(params.float()) - x).square().flatten(1).mean(1),
            recon=model.reconstruction_nll(params, x),
        )
        if progress is not None:
            progress(means.count)
    if means.count == 0:
        raise ValueError("batches is empty: there is nothing to evaluate.")
    recon, kl = float(means.mean("recon")), float(model.rate)
    return {
        tags.TEST_RECON_MSE: float(means.mean("squared_error")),
        tags.TEST_RECON: recon,
        tags.TEST_PERPLEXITY: float(perplexity(counts)),
        tags.TEST_CODEBOOK_USAGE: float(codebook_usage(counts)),
        tags.TEST_KL: kl,
        tags.TEST_ELBO: -(recon + kl),
        **_bits_per_dim(model, recon + kl),
        tags.TEST_NUM_EXAMPLES: means.count,
    }


@torch.no_grad()
def vqvae_prior_metrics(
    model, batches: Iterable[Tensor], progress: Progress | None = None
) -> dict[str, Any]:
    """Test metrics of a VQ-VAE with its learned prior (``VQVAEPrior``: ``.vqvae``, ``.prior``).

    The frozen VQ-VAE's own numbers (:func:`vqvae_metrics`), then with the prior p(c):
    ``test/kl`` = -log p(c(x)) = KL(one-hot q || p) (nats per example), ``test/elbo`` =
    -(recon + kl), a lower bound on log p(x) of the whole model, and ``test/bits_per_dim`` =
    -elbo / (pixels * ln 2).
    """
    batches = list(batches)
    metrics = vqvae_metrics(model.vqvae, batches)
    total_kl, done = 0.0, 0
    for x in batches:
        total_kl += float(model.prior.nll(model.codes(x).indices).double().sum())
        done += x.shape[0]
        if progress is not None:
            progress(done)
    kl = total_kl / metrics[tags.TEST_NUM_EXAMPLES]
    recon = metrics[tags.TEST_RECON]
    metrics.update({tags.TEST_KL: kl, tags.TEST_ELBO: -(recon + kl)})
    metrics.update(_bits_per_dim(model.vqvae, recon + kl))
    return metrics


def _bits_per_dim(model, nll: float) -> dict[str, float]:
    """``{test/bits_per_dim: ...}`` where the model's likelihood has a figure comparable with
    papers (``LatentVariableModule.bits_per_dim``: with the log2 L offset for a density on
    dequantized pixels), else ``{}``: no number is better than a wrong one."""
    bits = model.bits_per_dim(nll) if hasattr(model, "bits_per_dim") else None
    return {} if bits is None else {tags.TEST_BITS_PER_DIM: float(bits)}


@torch.no_grad()
def text_lm_metrics(
    model, batches: Iterable[Tensor], progress: Progress | None = None
) -> dict[str, Any]:
    """Test metrics of a language model (``TextLanguageModel``) on token-id batches (B, T)
    padded with 0: ``test/nll_iw`` = -log p(sentence), exact (no latent, so no importance
    samples), ``test/elbo`` = log p(sentence), nats per sentence averaged over the split, and
    ``test/perplexity`` = exp(sum NLL / sum predicted tokens), per token."""
    total_nll, total_tokens, done = 0.0, 0.0, 0
    for tokens in batches:
        terms = model.terms((tokens, (tokens != 0).sum(dim=1)))
        total_nll += float(terms["nll"].double().sum())
        total_tokens += float(terms["tokens"].double().sum())
        done += tokens.shape[0]
        if progress is not None:
            progress(done)
    return {
        tags.TEST_NLL_IW: total_nll / done,
        tags.TEST_ELBO: -total_nll / done,
        tags.TEST_PERPLEXITY: math.exp(total_nll / total_tokens),
        tags.TEST_NLL_PER_TOKEN: total_nll / total_tokens,
        tags.TEST_NUM_EXAMPLES: done,
    }


def evaluation_inputs(datamodule) -> Tensor:
    """The test split as one tensor: images (N, C, H, W), or for text the token ids (N, T)
    padded with 0 (``<pad>``); ``evaluate_split`` takes its first rows."""
    if getattr(datamodule, "modality", "image") == "text":
        return datamodule.padded("test")[0]
    return datamodule.test_split.images


def evaluate_split(
    model,
    images: Tensor,
    *,
    k: int,
    batch_size: int,
    chunk_size: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[str, int], Progress] | None = None,
) -> dict[str, Any]:
    """Every ``test/*`` likelihood number of ``model`` on ``images``, the one definition of
    those tags: ``vae-eval`` and ``vae-train test=true`` both call this.

    Dispatches on what the model provides: a language model (``modality = "text"``, ``images``
    then token ids, see :func:`evaluation_inputs`), a VQ-VAE prior (``.vqvae`` and ``.prior``), a VQ-VAE
    (``encode_indices``), or a Gaussian VAE (``encode``, ``decode``, ``reconstruction_nll``; a sentence VAE, ``modality = "text"``, also
    gets ``test/nll_per_token`` = sum NLL_iw / sum predicted tokens and ``test/perplexity`` =
    its exp, per token).
    ``progress(label, total)`` may return a callback that is told the examples done so far.
    The model should be in eval mode; ``seed`` keys the importance samples and, for a density
    on dequantized pixels, the dequantization noise, batch by batch (:func:`batch_seed`).
    Inside a ``torch.distributed`` group a Gaussian VAE's split is shared by the processes
    (module docstring); the other models are refused there.
    """
    rank, world_size = distributed_world()
    total = images.shape[0]

    def report(label: str, examples: int = total) -> Progress | None:
        return progress(label, examples) if progress is not None and rank == 0 else None

    torch.manual_seed(seed)
    batches = batches_of(images, batch_size, device)
    if getattr(model, "modality", "image") == "text" and not hasattr(model, "encode"):
        kind = "language model"
    elif hasattr(model, "prior") and hasattr(model, "vqvae"):
        kind = "prior"
    elif hasattr(model, "encode_indices") and hasattr(model, "num_codes"):
        kind = "vqvae"
    elif all(hasattr(model, m) for m in ("encode", "decode", "reconstruction_nll")):
        kind = "vae"
    else:
        raise ValueError(f"no test metrics are defined for a {type(model).__name__}.")
    if world_size > 1 and kind != "vae":
        raise ValueError(
            f"a {type(model).__name__} is evaluated in one process: only a VAE's importance "
            "sampling is shared across processes; run vae-eval without torchrun."
        )
    if kind == "language model":
        return text_lm_metrics(model, batches, report("nll"))
    if kind == "prior":
        return vqvae_prior_metrics(model, batches, report("prior"))
    if kind == "vqvae":
        return vqvae_metrics(model, batches, report("codes"))
    shard = shard_of_batches(math.ceil(total / batch_size), rank, world_size)
    generator = torch.Generator(device=device)
    batches = seeded_batches(images, batch_size, device, seed, generator, shard)
    own = min(shard.stop * batch_size, total) - shard.start * batch_size
    metrics = gaussian_vae_metrics(
        model, batches, k, chunk_size, generator, report(f"nll_iw k={k}", own)
    )
    if getattr(model, "modality", "image") == "text":  # a sentence VAE: ids padded with 0
        predicted = float(((images != 0).sum(dim=1) - 1).sum())
        total_nll = metrics[tags.TEST_NLL_IW] * metrics[tags.TEST_NUM_EXAMPLES]
        metrics[tags.TEST_NLL_PER_TOKEN] = total_nll / predicted
        metrics[tags.TEST_PERPLEXITY] = math.exp(total_nll / predicted)
    return metrics


# A label KL is +inf by definition when a class is never generated; every other test number is
# finite for a sound model.
MAY_BE_INFINITE = frozenset({tags.TEST_LABEL_KL, tags.TEST_LABEL_KL_REVERSE})


def non_finite_metrics(metrics: dict[str, Any]) -> list[str]:
    """``name=value`` of each number in ``metrics`` that must not go into a run's records: a
    NaN, or an infinity where none is a valid value. Both writers of ``test/*`` (``vae-eval``
    and ``vae-train test=true``) refuse to write when this is not empty."""
    return [
        f"{name}={value}"
        for name, value in metrics.items()
        if isinstance(value, float)
        and (math.isnan(value) or (math.isinf(value) and name not in MAY_BE_INFINITE))
    ]
