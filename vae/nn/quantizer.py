"""The vector quantizer of the VQ-VAE (van den Oord et al. 2017), with optional EMA codebook.

For channels-first latents z of shape (B, D, *spatial), each of the N = B * prod(spatial)
vectors z_n is replaced by its nearest code e_k, k = argmin_k ||z_n - e_k||^2, and

    loss = ||sg(z) - e||^2 + beta * ||z - sg(e)||^2        (codebook + beta * commitment)

per example (see ``vae.losses.vq``). The decoder sees e with the gradient routed to z
(straight-through, z + sg(e - z) in the paper), so the encoder gets d(recon)/de unchanged.

How this avoids the usual defects:

* **Search** (:func:`nearest_codes`). With t the codebook mean, ||z - e||^2 = ||z - t||^2
  - 2 (z - t).(e - t) + ||e - t||^2, and ||z - t||^2 does not change the argmin, so the scores
  are ||e - t||^2 - 2 (z - t).(e - t), one ``addmm`` per chunk of rows. Centring on t keeps
  float32 cancellation at the scale of the codes' spread, not of their distance from the
  origin. Rows whose best and runner-up scores are within twice the scores' rounding bound
  are re-ranked by float64 distances, so the choice is exact up to float64 rounding. Chunks of
  ``chunk_size`` rows reuse one (chunk_size, K) buffer, so the search's scratch memory grows
  with N only by a one-byte-per-row near-tie mask. No one-hot: histograms use ``bincount``,
  sums ``index_add_``, the lookup ``embedding``.
* **Precision.** Everything runs in float32 (the re-ranking of near-ties in float64) with
  autocast disabled: a bf16 score matrix would pick wrong codes (bf16 keeps ~3 significant
  digits) and bf16 EMA sums drift.
* **EMA** (``ema=True``, van den Oord et al. 2017, App. A.1; the codebook term is then dropped
  from the loss). Per code i, with n_i the batch count and m_i the batch sum of the z_n
  assigned to i::

      N_i <- decay * N_i + (1 - decay) * n_i
      M_i <- decay * M_i + (1 - decay) * m_i
      e_i  = M_i / N~_i,   N~_i = (N_i + eps) / (sum_j N_j + K eps) * sum_j N_j

  N~ is Laplace-smoothed: N~_i >= eps * n / (n + K eps) > 0 whenever the total n > 0, and n > 0
  always holds because N starts at 1 per code (with M = e, so that e = M / N at the start) and
  every batch adds a positive count. Hence no division by zero, and no epsilon hidden in it.
* **Distributed training.** When ``torch.distributed`` is initialised *at forward time* with
  more than one process, the batch statistics (n, m) are summed over all processes before
  they are used, so every process applies the same update, and restarts/k-means draw their
  vectors on process 0 and broadcast them.
* **Dead codes.** A code not chosen in ``dead_code_threshold`` consecutive training steps is
  dead; with ``restart_dead_codes`` it is re-seeded with a random encoder output of the
  current batch and its EMA state is reset to (N_i, M_i) = (1, e_i). ``dead_codes`` in the
  output counts the codes found dead in this step; ``num_restarted`` counts all restarts.
* **k-means init** (``kmeans_init=True``): the first training batch sets the codebook by
  k-means++ seeding and ``kmeans_iters`` Lloyd iterations, so no code starts far from the data.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vae.losses.vq import codebook_loss, commitment_loss, perplexity
from vae.nn.validation import positive_int

# Rows per search chunk. The scratch buffer is chunk_size * K * 4 bytes (16 MiB at K = 1024):
# large enough for an efficient matmul, small enough to stay near the cache.
DEFAULT_CHUNK_SIZE = 4096
# Columns per group of the two-stage argmin (``_argmin_and_runner_up``); 32 and 64 were the
# fastest on a CPU (K = 1024), 8 or 128 slower than a plain argmin.
SEARCH_GROUP = 32


class QuantizerOutput(NamedTuple):
    """What ``VectorQuantizer.forward`` returns.

    quantized: (B, D, *spatial) float32, straight-through (value of the codes, gradient to z).
    indices: (B, *spatial) int64, the chosen code at each position.
    loss: codebook_loss + commitment * commitment_loss, per example (scalar).
    codebook_loss: ||sg(z) - e||^2 per example; 0 with EMA (the codebook learns by EMA).
    commitment_loss: ||z - sg(e)||^2 per example, before the weight beta.
    perplexity: exp(entropy) of this step's code histogram (over all processes when training
        distributed): the effective number of codes in use, in [1, K].
    counts: (K,) float32 histogram of ``indices`` on this process (to accumulate over an epoch).
    dead_codes: number of codes found dead in this training step (re-seeded if restarts are
        on); 0 in eval mode or without dead-code tracking.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    perplexity: Tensor
    counts: Tensor
    dead_codes: Tensor


# --- plain functions (also used by the tests and the benchmark) ----------------------------


class StraightThrough(torch.autograd.Function):
    """Value of ``codes``, gradient passed to ``z`` unchanged (and none to ``codes``).

    Same as z + sg(codes - z) in exact arithmetic, but the value is exactly ``codes`` (no
    rounding from the add and subtract) and no (N, D) temporary is made.
    """

    @staticmethod
    def forward(ctx, z: Tensor, codes: Tensor) -> Tensor:
        return codes

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


# Unit roundoff u of a float32 matmul under each of torch's float32-matmul precision settings
# (``torch.set_float32_matmul_precision`` and the per-backend ``fp32_precision``): IEEE float32
# rounds to 24 significant bits; TF32 inputs keep 11 and bfloat16 inputs 8.
_FLOAT32_MATMUL_UNIT_ROUNDOFF = {
    "highest": 2.0**-24,
    "ieee": 2.0**-24,
    "none": 2.0**-24,
    "high": 2.0**-11,
    "tf32": 2.0**-11,
    "medium": 2.0**-8,
    "bf16": 2.0**-8,
}


def matmul_unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """u of a ``dtype`` matmul on ``device``: 2^-53 for float64; for float32 2^-24, or 2^-11 /
    2^-8 where torch's settings let float32 matmuls run in TF32 / bfloat16.

    Every setting that can apply is read (the global precision and the backend's own, CUDA's
    or oneDNN's) and the coarsest wins; a setting this function does not know counts as
    bfloat16. So the value is never finer than the matmul's true rounding.
    """
    if dtype == torch.float64:
        return 2.0**-53
    readings = []
    try:
        readings.append(torch.get_float32_matmul_precision())
    except RuntimeError:  # legacy and new settings mixed: the per-backend readings below decide
        pass
    backend = (
        torch.backends.cuda.matmul
        if device.type == "cuda"
        else getattr(torch.backends.mkldnn, "matmul", None)
    )
    for source in (backend, torch.backends):
        try:
            readings.append(source.fp32_precision)
        except (AttributeError, RuntimeError):  # torch < 2.9 has no per-backend setting
            pass
    return max(_FLOAT32_MATMUL_UNIT_ROUNDOFF.get(r, 2.0**-8) for r in readings)


def nearest_codes(points: Tensor, codebook: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    r"""argmin_k ||points_n - codebook_k||^2 for every row, as (N,) int64; ties to the lowest k.

    **Search.** The argmin does not change when points and codes move by the same vector t, so
    both are first centred on t = the codebook mean. With a = z_n - t and b_k = e_k - t the
    scores are ||b_k||^2 - 2 a.b_k (= ||z_n - e_k||^2 - ||a||^2, the same shift for every k),
    one ``addmm`` per chunk of ``chunk_size`` rows into one reused (chunk_size, K) buffer, then
    a two-stage argmin (:func:`_argmin_and_runner_up`). Centring keeps the float32
    cancellation at the scale of the codes' spread around t, not of their distance from the
    origin: uncentred, latents and codes N(50, I) get ~0.5% of their codes wrong (K = 1024,
    D = 64) and N(1000, I) most of them.

    **Exactness.** Each score is within M_n = (D + 4) u B (B + 2 A_n) of its exact value, with
    A_n = ||a|| and B = max_k ||b_k|| (of a and b_k as computed) and u the matmul's unit
    roundoff (:func:`matmul_unit_roundoff`). Rounding a and b_k moves a score by at most
    (2u + O(u^2)) B (B + 2 A_n), and the length-D dot product plus the addition of ||b_k||^2 by at
    most gamma_{D+1} B (B + 2 A_n), gamma_m = m u / (1 - m u) (Higham 2002, Sec. 3.1); their sum
    stays below M_n while (D + 1)^2 u <= 1/2 (D <= 2895 in float32). TF32 and bfloat16 matmuls
    round only their inputs to u and accumulate in float32, which M_n covers too. A row whose
    runner-up scores more than 2 M_n above its best (tested in float64) therefore has the exact
    argmin. The other rows, near-ties, are re-ranked: every code scoring within 2 M_n of the
    row's best (the exact nearest is among them) is compared by sum_d (z_nd - e_kd)^2 evaluated
    in float64, ties to the lowest k. The result agrees with a float64 brute force wherever the
    two nearest squared distances differ by more than float64 rounding.

    Near-ties are rare: of one draw of 65,536 N(0, I) latents (K = 1024, D = 64), 34 rows with
    N(0, I) codes and 16 with codes U(-1/K, 1/K) as ``VectorQuantizer`` initialises them. So
    the re-ranking costs little, and its scratch memory stays O(chunk_size * K) however many
    rows it takes.

    Args:
        points: (N, D), float32 or float64.
        codebook: (K, D), the same dtype and device.
        chunk_size: rows per score block.
    """
    if points.dim() != 2 or codebook.dim() != 2 or points.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"points must be (N, D) and codebook (K, D) with the same D, got {tuple(points.shape)} "
            f"and {tuple(codebook.shape)}."
        )
    if points.dtype not in (torch.float32, torch.float64) or codebook.dtype != points.dtype:
        raise ValueError(
            f"points and codebook must both be float32 or both float64, got {points.dtype} and "
            f"{codebook.dtype}."
        )
    chunk_size = positive_int(chunk_size, "nearest_codes", "chunk_size")
    num_points, code_dim = points.shape
    indices = torch.empty(num_points, dtype=torch.long, device=points.device)
    if num_points == 0:
        return indices
    with torch.autocast(device_type=points.device.type, enabled=False):
        centre = codebook.mean(0)
        codes = codebook - centre
        max_code_norm = torch.linalg.vector_norm(codes, dim=1, dtype=torch.float64).max()
        margin_scale = 2.0 * (code_dim + 4) * matmul_unit_roundoff(points.dtype, points.device)
        # Padding codes score +inf (inf - 2 a.0), so they are never chosen nor candidates.
        padding = -codebook.shape[0] % SEARCH_GROUP
        code_sq_norms = F.pad(codes.square().sum(1), (0, padding), value=float("inf"))
        codes_t = F.pad(codes.t(), (0, padding))
        rows = min(chunk_size, num_points)
        scores = points.new_empty(rows, code_sq_norms.shape[0])
        centred = points.new_empty(rows, code_dim)
        near_tie = torch.empty(num_points, dtype=torch.bool, device=points.device)
        for start in range(0, num_points, chunk_size):
            chunk = points[start : start + chunk_size]
            stop = start + chunk.shape[0]
            a = torch.sub(chunk, centre, out=centred[: chunk.shape[0]])
            block = torch.addmm(
                code_sq_norms, a, codes_t, beta=1, alpha=-2, out=scores[: a.shape[0]]
            )
            index, best, runner_up = _argmin_and_runner_up(block)
            indices[start:stop] = index
            margin = _near_tie_margin(a, max_code_norm, margin_scale)
            near_tie[start:stop] = runner_up.double() - best.double() <= margin
        ties = near_tie.nonzero().squeeze(1)  # the one host synchronisation
        if ties.numel() > 0:
            _rerank_near_ties(
                points,
                codebook,
                centre,
                code_sq_norms,
                codes_t,
                max_code_norm,
                margin_scale,
                ties,
                indices,
                chunk_size,
            )
    return indices


def _argmin_and_runner_up(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(argmin, min, second smallest value) of each row of ``scores`` (n, K), K a multiple of
    ``SEARCH_GROUP``; the argmin is the lowest index among equal minima, as ``torch.argmin``'s.

    In two stages: the minimum of each group of ``SEARCH_GROUP`` consecutive columns (a
    vectorised ``amin``), then the first group holding the row minimum and the first position
    in it. The runner-up is the smaller of the next value in that group and the other groups'
    minima. On a CPU this takes about half the time of one ``argmin`` over the K columns.
    """
    rows, num_columns = scores.shape
    groups = scores.view(rows, num_columns // SEARCH_GROUP, SEARCH_GROUP)
    group_min = groups.amin(2)
    group = group_min.argmin(1, keepdim=True)
    in_group = groups.gather(1, group.unsqueeze(2).expand(-1, 1, SEARCH_GROUP)).squeeze(1)
    position = in_group.argmin(1, keepdim=True)
    best = in_group.gather(1, position).squeeze(1)
    runner_up = torch.minimum(
        in_group.scatter_(1, position, float("inf")).amin(1),
        group_min.scatter_(1, group, float("inf")).amin(1),
    )
    return (group * SEARCH_GROUP + position).squeeze(1), best, runner_up


def _near_tie_margin(centred: Tensor, max_code_norm: Tensor, margin_scale: float) -> Tensor:
    """2 M_n = 2 (D + 4) u (B^2 + 2 A_n B) per row, float64; ``margin_scale`` = 2 (D + 4) u."""
    row_norms = torch.linalg.vector_norm(centred, dim=1, dtype=torch.float64)
    return margin_scale * max_code_norm * (max_code_norm + 2.0 * row_norms)


def _rerank_near_ties(
    points: Tensor,
    codebook: Tensor,
    centre: Tensor,
    code_sq_norms: Tensor,
    codes_t: Tensor,
    max_code_norm: Tensor,
    margin_scale: float,
    rows: Tensor,
    indices: Tensor,
    chunk_size: int,
) -> None:
    """For each row in ``rows``: among the codes scoring within 2 M_n of the row's best, the one
    nearest by float64 squared distance, lowest index on ties; written into ``indices``.

    The scores are recomputed (any rounding of them is within M_n, so the exact nearest is
    still within 2 M_n of the best). Candidate pairs are evaluated in slices of at most
    chunk_size * K / (2 D) pairs: two (pairs, D) float64 tensors the size of one score block.
    """
    num_codes, code_dim = codebook.shape
    pairs_per_slice = max(1, chunk_size * num_codes // (2 * code_dim))
    for start in range(0, rows.numel(), chunk_size):
        row_ids = rows[start : start + chunk_size]
        a = points[row_ids] - centre
        scores = torch.addmm(code_sq_norms, a, codes_t, beta=1, alpha=-2).double()
        limit = scores.amin(1) + _near_tie_margin(a, max_code_norm, margin_scale)
        pair_row, pair_code = (scores <= limit.unsqueeze(1)).nonzero(as_tuple=True)
        del scores
        distance = torch.empty(pair_row.numel(), dtype=torch.float64, device=points.device)
        for first in range(0, pair_row.numel(), pairs_per_slice):
            last = first + pairs_per_slice
            z = points[row_ids[pair_row[first:last]]].double()
            e = codebook[pair_code[first:last]].double()
            distance[first:last] = z.sub_(e).square_().sum(1)
        nearest = torch.full(
            (row_ids.numel(),), float("inf"), dtype=torch.float64, device=points.device
        ).scatter_reduce_(0, pair_row, distance, "amin")
        code_if_nearest = torch.where(distance == nearest[pair_row], pair_code, num_codes)
        chosen = torch.full_like(row_ids, num_codes).scatter_reduce_(
            0, pair_row, code_if_nearest, "amin"
        )
        indices[row_ids] = chosen


def laplace_smoothed_counts(counts: Tensor, eps: float) -> Tensor:
    """(N_i + eps) / (n + K eps) * n with n = sum_i N_i: every entry > 0 when n > 0, same total."""
    total = counts.sum()
    return (counts + eps) / (total + counts.numel() * eps) * total


def ema_codebook_update(
    ema_counts: Tensor,
    ema_embed_sum: Tensor,
    batch_counts: Tensor,
    batch_embed_sum: Tensor,
    decay: float,
    eps: float,
) -> Tensor:
    """Update (N, M) in place by one EMA step and return the new codebook M_i / N~_i.

    N <- decay N + (1 - decay) n,  M <- decay M + (1 - decay) m,  e_i = M_i / N~_i with N~ the
    Laplace-smoothed N (``laplace_smoothed_counts``).
    """
    ema_counts.lerp_(batch_counts, 1.0 - decay)
    ema_embed_sum.lerp_(batch_embed_sum, 1.0 - decay)
    return ema_embed_sum / laplace_smoothed_counts(ema_counts, eps).unsqueeze(1)


def kmeans_plus_plus_seeds(points: Tensor, num_clusters: int) -> Tensor:
    """Initial centres by k-means++ (Arthur & Vassilvitskii 2007): each next centre is a row
    drawn with probability proportional to its squared distance to the nearest centre so far.

    O(N * D) per centre. Falls back to uniform draws once every row coincides with a centre.
    """
    num_points = points.shape[0]
    centres = points.new_empty(num_clusters, points.shape[1])
    first = torch.randint(num_points, (1,), device=points.device)
    centres[0] = points[first[0]]
    nearest_sq = (points - centres[0]).pow(2).sum(1)
    for k in range(1, num_clusters):
        total = nearest_sq.sum()
        if bool(total > 0):
            chosen = torch.multinomial(nearest_sq / total, 1)[0]
        else:
            chosen = torch.randint(num_points, (1,), device=points.device)[0]
        centres[k] = points[chosen]
        nearest_sq = torch.minimum(nearest_sq, (points - centres[k]).pow(2).sum(1))
    return centres


def kmeans(
    points: Tensor, num_clusters: int, iters: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """``num_clusters`` centres by Lloyd's algorithm from k-means++ seeds.

    A cluster that loses all its points keeps its previous centre.
    """
    centres = kmeans_plus_plus_seeds(points, num_clusters)
    for _ in range(iters):
        assignment = nearest_codes(points, centres, chunk_size)
        counts = torch.bincount(assignment, minlength=num_clusters).to(points.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        used = counts > 0
        centres[used] = sums[used] / counts[used].unsqueeze(1)
    return centres


def distributed_world_size() -> int:
    """Processes in the default group, or 1 when ``torch.distributed`` is not initialised now."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all processes (no-op in a single process)."""
    if distributed_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_first(tensor: Tensor) -> Tensor:
    """Overwrite ``tensor`` in place with process 0's value (no-op in a single process)."""
    if distributed_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


# --- the module ------------------------------------------------------------------------------


def _check_number(value: float, name: str, low: float, high: float) -> float:
    """``value`` as a float in [low, high), else ``ValueError`` naming the argument."""
    number = float(value)
    if not low <= number < high:
        raise ValueError(
            f"VectorQuantizer: argument '{name}' must be in [{low}, {high}), got {value!r}."
        )
    return number


def flatten_codes(z: Tensor, code_dim: int, hint: str) -> Tensor:
    """Channels-first encoder output (B, code_dim, *spatial) as rows (B * prod(spatial),
    code_dim), or a ValueError that ends with ``hint`` when the channels do not match."""
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise ValueError(
            f"z must be a floating-point tensor, got {type(z).__name__} {getattr(z, 'dtype', '')}."
        )
    if z.dim() < 2 or z.shape[1] != code_dim:
        raise ValueError(
            f"z must be channels-first (batch, code_dim={code_dim}, *spatial), got shape "
            f"{tuple(z.shape)}; {hint}"
        )
    if z.numel() == 0:
        raise ValueError(f"z must not be empty, got shape {tuple(z.shape)}.")
    return z.movedim(1, -1).reshape(-1, code_dim)


def unflatten_codes(rows: Tensor, z: Tensor) -> Tensor:
    """The inverse of :func:`flatten_codes`: rows back in ``z``'s (B, code_dim, *spatial)."""
    return rows.reshape(z.shape[0], *z.shape[2:], z.shape[1]).movedim(-1, 1)


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with straight-through gradients; see the module docstring.

    Args:
        num_codes: K, the number of codes.
        code_dim: D, the size of each code.
        commitment: beta >= 0, the weight of the commitment term.
        ema: learn the codebook by exponential moving averages instead of the codebook loss.
        decay: EMA decay in [0, 1).
        eps: Laplace smoothing of the EMA counts, > 0.
        dead_code_threshold: training steps a code may go unused before it counts as dead;
            None turns dead-code tracking (and restarts) off.
        restart_dead_codes: re-seed dead codes from the current encoder outputs.
        kmeans_init: set the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that k-means.
        chunk_size: rows per block of the nearest-code search.

    ``self.codebook`` is (K, D): a parameter without EMA, a buffer with EMA.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        commitment: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: int | None = 100,
        restart_dead_codes: bool = True,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        self.num_codes = positive_int(num_codes, "VectorQuantizer", "num_codes")
        self.code_dim = positive_int(code_dim, "VectorQuantizer", "code_dim")
        self.commitment = _check_number(commitment, "commitment", 0.0, float("inf"))
        self.ema = bool(ema)
        self.decay = _check_number(decay, "decay", 0.0, 1.0)
        self.eps = float(eps)
        if not self.eps > 0:
            raise ValueError(f"VectorQuantizer: argument 'eps' must be > 0, got {eps!r}.")
        if dead_code_threshold is not None:  # None turns dead-code tracking off
            dead_code_threshold = positive_int(
                dead_code_threshold, "VectorQuantizer", "dead_code_threshold"
            )
        self.dead_code_threshold = dead_code_threshold
        self.restart_dead_codes = bool(restart_dead_codes)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = positive_int(kmeans_iters, "VectorQuantizer", "kmeans_iters")
        self.chunk_size = positive_int(chunk_size, "VectorQuantizer", "chunk_size")

        # Small codes, as in the paper's reference setting: every code starts near the origin.
        initial = torch.empty(self.num_codes, self.code_dim).uniform_(
            -1.0 / self.num_codes, 1.0 / self.num_codes
        )
        if self.ema:
            self.register_buffer("codebook", initial)
            self.register_buffer("ema_counts", torch.ones(self.num_codes))
            self.register_buffer("ema_embed_sum", initial.clone())
        else:
            self.codebook = nn.Parameter(initial)
        self.register_buffer("steps_since_used", torch.zeros(self.num_codes, dtype=torch.long))
        self.register_buffer("num_restarted", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(not self.kmeans_init))

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, code_dim={self.code_dim}, commitment={self.commitment}, "
            f"ema={self.ema}, decay={self.decay}, dead_code_threshold={self.dead_code_threshold}, "
            f"restart_dead_codes={self.restart_dead_codes}, kmeans_init={self.kmeans_init}"
        )

    # --- helpers -------------------------------------------------------------------------------
    def _flatten(self, z: Tensor) -> Tensor:
        hint = "check that the encoder's output channels equal the quantizer's code_dim."
        return flatten_codes(z, self.code_dim, hint)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes for integer ``indices`` (B, *spatial) as channels-first (B, D, *spatial)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}.")
        return F.embedding(indices, self.codebook.float()).movedim(-1, 1)

    @torch.no_grad()
    def _set_codes(self, which: Tensor, vectors: Tensor) -> None:
        """Overwrite the codes ``which`` (bool mask or indices) and reset their EMA state."""
        self.codebook[which] = vectors.to(self.codebook.dtype)
        if self.ema:
            self.ema_counts[which] = 1.0
            self.ema_embed_sum[which] = vectors.to(self.ema_embed_sum.dtype)
        self.steps_since_used[which] = 0

    @torch.no_grad()
    def _initialise_by_kmeans(self, flat: Tensor) -> None:
        centres = kmeans(flat, self.num_codes, self.kmeans_iters, self.chunk_size)
        broadcast_from_first(centres)
        self._set_codes(torch.ones(self.num_codes, dtype=torch.bool, device=flat.device), centres)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, local_counts: Tensor) -> tuple[Tensor, Tensor]:
        """EMA step and dead-code restarts for one training batch.

        Returns (the code histogram summed over all processes, the number of dead codes).
        """
        if self.ema:
            # One collective for both statistics: [m | n] as a (K, D + 1) block.
            stats = torch.zeros(self.num_codes, self.code_dim + 1, device=flat.device)
            stats[:, : self.code_dim].index_add_(0, indices, flat)
            stats[:, self.code_dim] = local_counts
            all_reduce_sum(stats)
            counts = stats[:, self.code_dim]
            new_codebook = ema_codebook_update(
                self.ema_counts,
                self.ema_embed_sum,
                counts,
                stats[:, : self.code_dim],
                self.decay,
                self.eps,
            )
            self.codebook.copy_(new_codebook)
        else:
            counts = all_reduce_sum(local_counts.clone())
        if self.dead_code_threshold is None:
            return counts, torch.zeros((), dtype=torch.long, device=flat.device)
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_since_used >= self.dead_code_threshold
        num_dead = int(dead.sum())  # equal on every process: counts were summed over them
        if num_dead and self.restart_dead_codes:
            rows = torch.randint(flat.shape[0], (num_dead,), device=flat.device)
            vectors = broadcast_from_first(flat[rows].clone())
            self._set_codes(dead, vectors)
            self.num_restarted.add_(num_dead)
        return counts, torch.tensor(num_dead, device=flat.device)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channels-first ``z`` (B, D, *spatial); see ``QuantizerOutput``."""
        flat_in = self._flatten(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = flat_in.float()
            if self.training and self.kmeans_init and not bool(self.initialised):
                self._initialise_by_kmeans(flat.detach())
            codebook = self.codebook.float()
            with torch.no_grad():
                indices = nearest_codes(flat.detach(), codebook.detach(), self.chunk_size)
            selected = F.embedding(indices, codebook)
            batch = z.shape[0]
            per_example = (flat.reshape(batch, -1), selected.reshape(batch, -1))
            commitment_term = commitment_loss(*per_example)
            # With EMA the codebook is not learned by gradient, so its term is not even built.
            codebook_term = (
                torch.zeros_like(commitment_term) if self.ema else codebook_loss(*per_example)
            )
            loss = codebook_term + self.commitment * commitment_term
            straight_through = StraightThrough.apply(flat, selected.detach())

            counts = torch.bincount(indices, minlength=self.num_codes).float()
            if self.training:
                global_counts, dead_codes = self._update(flat.detach(), indices, counts)
            else:
                global_counts = counts
                dead_codes = torch.zeros((), dtype=torch.long, device=z.device)
            batch_perplexity = perplexity(global_counts, validate=False).float()

        quantized = unflatten_codes(straight_through, z)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.reshape(z.shape[0], *z.shape[2:]),
            loss=loss,
            codebook_loss=codebook_term,
            commitment_loss=commitment_term,
            perplexity=batch_perplexity,
            counts=counts,
            dead_codes=dead_codes,
        )
