"""TensorBoard tag names: the single source of truth.

Every scalar is in nats per example (summed over latent dimensions and pixels, averaged over
the batch) unless its name says otherwise (``bits_per_dim``, ``perplexity``, fractions, counts).
``metrics.json`` uses the same names as keys.
"""

# Gaussian VAE
TRAIN_LOSS = "train/loss"
TRAIN_RECON = "train/recon"
TRAIN_KL = "train/kl"
TRAIN_BETA = "train/beta"
VAL_LOSS = "val/loss"
VAL_RECON = "val/recon"
VAL_KL = "val/kl"
VAL_ELBO = "val/elbo"
VAL_BITS_PER_DIM = "val/bits_per_dim"
VAL_ACTIVE_UNITS = "val/active_units"
VAL_KL_PER_DIM = "val/kl_per_dim"  # histogram

# Images
VAL_RECONSTRUCTIONS = "val/reconstructions"
VAL_SAMPLES = "val/samples"

# Run-level numbers that are not TensorBoard series
TRAIN_SAMPLES_PER_S = "train_samples_per_s"

VAE_TRAIN_SCALARS = (TRAIN_LOSS, TRAIN_RECON, TRAIN_KL, TRAIN_BETA)
VAE_VAL_SCALARS = (VAL_LOSS, VAL_RECON, VAL_KL, VAL_ELBO, VAL_BITS_PER_DIM, VAL_ACTIVE_UNITS)
VAE_SCALARS = VAE_TRAIN_SCALARS + VAE_VAL_SCALARS
VAE_HISTOGRAMS = (VAL_KL_PER_DIM,)
IMAGES = (VAL_RECONSTRUCTIONS, VAL_SAMPLES)


def tag(prefix: str, name: str) -> str:
    """``tag("val", "kl") == "val/kl"``: build a tag from a split prefix and a term name."""
    return f"{prefix}/{name}"
