"""TensorBoard tag names: the single source of truth.

Every scalar is in nats per example (summed over latent dimensions and pixels, averaged over
the batch) unless its name says otherwise (``bits_per_dim``, ``perplexity``, fractions, counts).
``metrics.json`` uses the same names as keys. Each tag has one definition wherever it is
written.

Likelihood units. For a Bernoulli likelihood on binarized pixels the nats are of a probability.
For a density (``gaussian``, ``laplace``) on discrete pixels the model is fitted to uniformly
dequantized pixels y = (k + u) / L (L = the data's ``num_levels``), and recon, elbo and nll_iw
are of that density. ``*/bits_per_dim`` is always the discrete figure comparable with papers:

    bits_per_dim = NLL / (pixels * ln 2)              Bernoulli on binarized pixels
    bits_per_dim = NLL / (pixels * ln 2) + log2(L)    a density on dequantized pixels

with NLL = -elbo (``val/``) or ``test/nll_iw``. It is not written where no such figure exists:
a Bernoulli likelihood on grey levels (``data.binarize=none``) is a cross-entropy, not a
likelihood.
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
VAL_KL_PER_DIM_CHART = "val/kl_per_dim_chart"  # image: one bar per latent dimension, in order
# Where the KL goes (vae.losses.decomposition), over the whole validation split's aggregate
# posterior q(z), once per validation epoch; val/mutual_info + val/total_correlation +
# val/dimwise_kl = val/kl (the closed-form mean KL; only the split between them is estimated,
# from 1,000 seeded draws). val/mutual_info is I_q(x; z), in [0, log N_val]: with val/kl it is
# the diagnostic of posterior collapse (both -> 0).
VAL_MUTUAL_INFO = "val/mutual_info"
VAL_TOTAL_CORRELATION = "val/total_correlation"
VAL_DIMWISE_KL = "val/dimwise_kl"
KL_DECOMPOSITION = ("mutual_info", "total_correlation", "dimwise_kl")  # the terms' names

# Images
VAL_RECONSTRUCTIONS = "val/reconstructions"
VAL_SAMPLES = "val/samples"
VAL_INTERPOLATION = "val/interpolation"  # text: decodings between two sentences' latents

# Run-level numbers that are not TensorBoard series
TRAIN_SAMPLES_PER_S = "train_samples_per_s"

VAE_TRAIN_SCALARS = (TRAIN_LOSS, TRAIN_RECON, TRAIN_KL, TRAIN_BETA)
VAE_VAL_SCALARS = (
    VAL_LOSS,
    VAL_RECON,
    VAL_KL,
    VAL_ELBO,
    VAL_BITS_PER_DIM,
    VAL_ACTIVE_UNITS,
    VAL_MUTUAL_INFO,
    VAL_TOTAL_CORRELATION,
    VAL_DIMWISE_KL,
)
VAE_SCALARS = VAE_TRAIN_SCALARS + VAE_VAL_SCALARS
VAE_HISTOGRAMS = (VAL_KL_PER_DIM,)
IMAGES = (VAL_RECONSTRUCTIONS, VAL_SAMPLES)


def tag(prefix: str, name: str) -> str:
    """``tag("val", "kl") == "val/kl"``: build a tag from a split prefix and a term name."""
    return f"{prefix}/{name}"


# Reliability
TRAIN_SKIPPED_BATCHES = "train/skipped_batches"  # non-finite batches skipped (NonFiniteGuard)


# VQ-VAE (vae.models.VQVAE). vq_loss and commitment are squared distances in latent units per
# example (summed over positions and code dimensions), not nats; see vae.losses.vq.
#   train/vq_loss      codebook + beta * commitment: what the quantizer adds to the loss
#   train/commitment   ||z - sg(e)||^2, before beta
#   train/perplexity   exp(entropy) of this step's code histogram (effective codes in use)
#   train/dead_codes   codes unused for model.dead_code_threshold steps, found at this step
#   train/restarted_codes  all dead-code restarts so far (its slope is the restart rate)
#   with model/quantizer=fsq: vq_loss, commitment, dead_codes and restarted_codes are 0 (no
#   codebook, no loss on it, nothing to restart)
#   train/kl, val/kl   the rate against the uniform prior: latent positions x log K nats
#   val/perplexity, val/codebook_usage  from the code histogram of the whole validation epoch
#   val/mse            mean squared error per pixel between the decoder mean and x
TRAIN_VQ_LOSS = "train/vq_loss"
TRAIN_COMMITMENT = "train/commitment"
TRAIN_PERPLEXITY = "train/perplexity"
TRAIN_DEAD_CODES = "train/dead_codes"
TRAIN_RESTARTED_CODES = "train/restarted_codes"
VAL_PERPLEXITY = "val/perplexity"
VAL_CODEBOOK_USAGE = "val/codebook_usage"
VAL_MSE = "val/mse"
VAL_CODE_HISTOGRAM = "val/code_histogram"  # image: one bar per code, sorted by use

VQVAE_TRAIN_SCALARS = (
    TRAIN_LOSS,
    TRAIN_RECON,
    TRAIN_VQ_LOSS,
    TRAIN_COMMITMENT,
    TRAIN_PERPLEXITY,
    TRAIN_DEAD_CODES,
    TRAIN_RESTARTED_CODES,
    TRAIN_KL,
)
VQVAE_VAL_SCALARS = (
    VAL_LOSS,
    VAL_RECON,
    VAL_KL,
    VAL_ELBO,
    VAL_BITS_PER_DIM,
    VAL_MSE,
    VAL_PERPLEXITY,
    VAL_CODEBOOK_USAGE,
)
VQVAE_IMAGES = (*IMAGES, VAL_CODE_HISTOGRAM)

# VQ-VAE prior (vae.models.VQVAEPrior, second stage). Same names as the VAE's, for one axis:
#   train/kl, val/kl   -log p(codes) under the learned prior: KL(one-hot q || prior), nats
#   val/elbo           -(recon + kl), a lower bound on log p(x) of VQ-VAE + prior
#   val/bits_per_dim   from -val/elbo, as in the module docstring
VQVAE_PRIOR_TRAIN_SCALARS = (TRAIN_LOSS, TRAIN_KL)
VQVAE_PRIOR_VAL_SCALARS = (VAL_LOSS, VAL_RECON, VAL_KL, VAL_ELBO, VAL_BITS_PER_DIM)

# The KL-centred variants of the Gaussian VAE (issue 17); each also writes the VAE tags above.
# IWAE (vae.models.IWAE, model=iwae): trains on the k-sample bound (Burda et al. 2016)
#   train/iw_bound, val/iw_bound   L_k = logsumexp_i log w_i - log k, nats per example;
#                      train/loss = -train/iw_bound. val/elbo stays the ELBO (comparable runs).
TRAIN_IW_BOUND = "train/iw_bound"
VAL_IW_BOUND = "val/iw_bound"
IWAE_TRAIN_SCALARS = (TRAIN_LOSS, TRAIN_RECON, TRAIN_KL, TRAIN_IW_BOUND)
IWAE_VAL_SCALARS = (*VAE_VAL_SCALARS, VAL_IW_BOUND)
# beta-TCVAE (vae.models.BetaTCVAE, model=beta_tcvae; Chen et al. 2018): the minibatch (MSS or
# MWS) estimates of the KL's three parts at the batch's own draws, train only; they add up to a
# one-sample estimate of train/kl. The whole-split val/mutual_info etc. are the VAE's.
TRAIN_MUTUAL_INFO_MB = "train/mutual_info_mb"
TRAIN_TOTAL_CORRELATION_MB = "train/total_correlation_mb"
TRAIN_DIMWISE_KL_MB = "train/dimwise_kl_mb"
BETA_TCVAE_TRAIN_SCALARS = (
    TRAIN_LOSS,
    TRAIN_RECON,
    TRAIN_KL,
    TRAIN_MUTUAL_INFO_MB,
    TRAIN_TOTAL_CORRELATION_MB,
    TRAIN_DIMWISE_KL_MB,
)
# VampPrior (vae.models.VampPriorVAE, model=vampprior): train/kl and val/kl are Monte Carlo
# estimates over model.kl_samples draws (no closed form against a mixture prior), so there is no
# val/kl_per_dim; val/dimwise_kl is then KL(q(z) || p(z)) - TC (can be < 0: p does not factorise).
# Ladder VAE (vae.models.LadderVAE, model=ladder_vae): two latent layers, z1 next to x, z2 on top
#   val/kl_layer1, val/kl_layer2   KL(q(z1|x,z2) || p(z1|z2)) at the drawn z2, KL(q(z2|x) || N(0,I));
#                      they add up to val/kl; no KL decomposition (q(z|x) is not one diagonal Gaussian)
#   val/kl_per_dim_layer1, val/kl_per_dim_layer2   histograms, one value per dimension of the layer
VAL_KL_LAYER1 = "val/kl_layer1"
VAL_KL_LAYER2 = "val/kl_layer2"
VAL_KL_PER_DIM_LAYER1 = "val/kl_per_dim_layer1"
VAL_KL_PER_DIM_LAYER2 = "val/kl_per_dim_layer2"

# Text language model (vae.models.TextLanguageModel, model=text_lm). Nats per sentence, pads
# excluded; no latent, so no kl:
#   train/loss, val/loss  KL(target || predicted) summed over a sentence's next-token targets
#                      (= the NLL for one-hot targets; NLL - H(target) with label smoothing)
#   val/elbo           log p(sentence) = -NLL, exact (no latent); picks the best checkpoint
#   val/perplexity     exp(sum NLL / sum predicted tokens) over the validation epoch, per token
#   val/samples        text (TensorBoard's text plugin): sampled sentences
TEXT_LM_TRAIN_SCALARS = (TRAIN_LOSS,)
TEXT_LM_VAL_SCALARS = (VAL_LOSS, VAL_ELBO, VAL_PERPLEXITY)
TEXT_LM_TEXTS = (VAL_SAMPLES,)

# Sentence VAE (vae.models.TextVAE, model=text_vae). Nats per sentence, pads excluded; the VAE
# scalars (train/beta, val/recon, val/kl, val/elbo, val/active_units, val/kl_per_dim, and the
# KL decomposition val/mutual_info, val/total_correlation, val/dimwise_kl) as above:
#   val/perplexity     exp(sum -ELBO / sum predicted tokens) per token: an upper bound (a bound)
#   val/samples, val/reconstructions, val/interpolation   text: greedy decodings of prior
#                      draws, of validation sentences' mu, and along mu_1 + t (mu_2 - mu_1)
TEXT_VAE_TRAIN_SCALARS = VAE_TRAIN_SCALARS
TEXT_VAE_VAL_SCALARS = (
    VAL_LOSS,
    VAL_RECON,
    VAL_KL,
    VAL_ELBO,
    VAL_ACTIVE_UNITS,
    VAL_PERPLEXITY,
    VAL_MUTUAL_INFO,
    VAL_TOTAL_CORRELATION,
    VAL_DIMWISE_KL,
)
TEXT_VAE_TEXTS = (VAL_SAMPLES, VAL_RECONSTRUCTIONS, VAL_INTERPOLATION)

# Test split. One owner: vae.eval.suite.evaluate_split, called by `vae-eval` and by
# `vae-train test=true` (same eval.* settings, same numbers), into the run's TensorBoard and
# metrics.json. Sample scores (label KL, classifier score, FID) come from `vae-eval` only.
#   test/nll_iw          -log (1/k) sum_i p(x, z_i) / q(z_i|x), k = test/importance_samples (nats);
#                        its expectation bounds -log p(x) from above and tightens as k grows
#   test/elbo            -(test/recon + test/kl), exact KL, k-sample reconstruction term (nats)
#   test/bits_per_dim    Gaussian VAE: from test/nll_iw; VQ-VAE: from -test/elbo with test/kl the
#                        rate under the uniform prior (latent positions x log K), or under the
#                        learned prior (-log p(codes)) for a VQ-VAE prior run; see the module
#                        docstring for the log2(L) offset of densities, and where it is absent
#   test/active_units    units with Var_x(E_q[z_d]) > 0.01 (Burda et al. 2016)
#   test/mutual_info, test/total_correlation, test/dimwise_kl  the KL decomposition over the
#                        whole split (every example a draw, up to 10,000), as val/ above
#   test/kl_per_dim      histogram in TensorBoard, a list (nats per dimension) in metrics.json
#   test/recon_mse       VQ-VAE: mean squared error per pixel of the decoder mean
#   test/perplexity, test/codebook_usage  VQ-VAE: from the code histogram of the whole split
#   test/label_kl        KL(h_gen || h_data): histogram of the samples' predicted labels against the
#                        split's labels, nats; sees over-generation, charges a class never generated
#                        only for the mass moved elsewhere (log(10/9) = 0.105 for 1 of 10 classes)
#   test/label_kl_reverse  KL(h_data || h_gen), nats; +inf when a class of the split is never a
#                        predicted label of a sample (a dropped mode)
#   test/classifier_score  exp(E_x KL(p(y|x) || p(y))) of samples, in [1, classes]; *_real: of the
#                        split's images, a reference, not a ceiling
#   test/classifier_accuracy  accuracy of that classifier on the split's images
#   test/fid             only where Inception weights are installed
#   test/num_examples, test/importance_samples, test/num_samples  the protocol of the numbers
TEST_NLL_IW = "test/nll_iw"
TEST_ELBO = "test/elbo"
TEST_RECON = "test/recon"
TEST_KL = "test/kl"
TEST_KL_PER_DIM = "test/kl_per_dim"
TEST_BITS_PER_DIM = "test/bits_per_dim"
TEST_ACTIVE_UNITS = "test/active_units"
TEST_MUTUAL_INFO = "test/mutual_info"
TEST_TOTAL_CORRELATION = "test/total_correlation"
TEST_DIMWISE_KL = "test/dimwise_kl"
TEST_RECON_MSE = "test/recon_mse"
TEST_PERPLEXITY = "test/perplexity"
TEST_NLL_PER_TOKEN = "test/nll_per_token"  # text: sum test/nll_iw / sum predicted tokens, nats
TEST_CODEBOOK_USAGE = "test/codebook_usage"
TEST_LABEL_KL = "test/label_kl"
TEST_LABEL_KL_REVERSE = "test/label_kl_reverse"
TEST_CLASSIFIER_SCORE = "test/classifier_score"
TEST_CLASSIFIER_SCORE_REAL = "test/classifier_score_real"
TEST_CLASSIFIER_ACCURACY = "test/classifier_accuracy"
TEST_FID = "test/fid"
TEST_NUM_EXAMPLES = "test/num_examples"
TEST_IMPORTANCE_SAMPLES = "test/importance_samples"
TEST_NUM_SAMPLES = "test/num_samples"

VAE_TEST_SCALARS = (
    TEST_NLL_IW,
    TEST_ELBO,
    TEST_RECON,
    TEST_KL,
    TEST_BITS_PER_DIM,
    TEST_ACTIVE_UNITS,
    TEST_MUTUAL_INFO,
    TEST_TOTAL_CORRELATION,
    TEST_DIMWISE_KL,
)
VQVAE_TEST_SCALARS = (TEST_RECON_MSE, TEST_RECON, TEST_PERPLEXITY, TEST_CODEBOOK_USAGE)
SAMPLE_SCORE_SCALARS = (
    TEST_LABEL_KL,
    TEST_LABEL_KL_REVERSE,
    TEST_CLASSIFIER_SCORE,
    TEST_CLASSIFIER_SCORE_REAL,
    TEST_CLASSIFIER_ACCURACY,
)
TEST_HISTOGRAMS = (TEST_KL_PER_DIM,)
