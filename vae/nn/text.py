"""A GRU language model: Embedding -> GRU -> Linear, with its loss and its sampler.

The loss is the project's :class:`vae.losses.KLDivergence` between the target distribution of
each next token and the predicted one, KL(target || softmax(logits)), summed over the tokens of
a sentence (``<pad>`` positions excluded) and averaged over the batch: nats per sentence. With
one-hot targets it equals the cross-entropy (the NLL); with label smoothing eps over V tokens,
target = (1 - eps) one_hot + eps / V, and

    KL(target || p) = CE(target, p) - H(target),

so it has the gradients of the smoothed cross-entropy and is 0 at its optimum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vae.losses import KLDivergence

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # as in vae.data.fortunes


def _gru(input_dim: int, hidden_dim: int, num_layers: int, dropout: float) -> nn.GRU:
    """A batch-first GRU; ``dropout`` between its layers (torch warns on one layer)."""
    return nn.GRU(
        input_dim,
        hidden_dim,
        num_layers,
        batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0,
    )


class GRULanguageModel(nn.Module):
    """p(w_t | w_<t) by a GRU over word embeddings.

    Args:
        vocab_size: V, the number of token ids (``<pad>`` = 0 included).
        embed_dim: size of the word embeddings.
        hidden_dim: size of the GRU state.
        num_layers: stacked GRU layers.
        dropout: dropout on the embeddings and between GRU layers.
        context_dim: size of a vector joined to every input embedding (0: none; the
            ``LatentGRUDecoder`` joins z).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("embed_dim", embed_dim),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.gru = _gru(embed_dim + context_dim, hidden_dim, num_layers, dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def forward(
        self, tokens: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) of the token after each position of ``tokens`` (B, T), and the GRU
        state after the last one. The GRU is causal, so padding at the end of a row changes
        nothing before it: no packing is needed, the loss masks the padded positions."""
        features, state = self.features(tokens, state)
        return self.output(features), state

    def features(
        self, tokens: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``self.output`` maps to logits: (B, T, hidden_dim), and the GRU state."""
        hidden, state = self.gru(self.dropout(self.embedding(tokens)), state)
        return self.dropout(hidden), state

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        **condition: torch.Tensor,
    ) -> torch.Tensor:
        """Token ids (num_samples, <= max_tokens + 1) drawn from ``<bos>``, ending in ``<eos>``
        or cut at ``max_tokens`` words; positions after a row's ``<eos>`` are ``<pad>``.

        Each step draws from softmax(logits / temperature) restricted to the ``top_k`` most
        likely tokens (None: all; 1: greedy decoding); ``<pad>`` and ``<bos>`` are never drawn.
        ``condition`` goes to every call of ``self`` (a latent decoder's ``z``).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        device = self.output.weight.device
        token = torch.full((num_samples, 1), BOS_ID, dtype=torch.long, device=device)
        state, rows = None, []
        done = torch.zeros(num_samples, dtype=torch.bool, device=device)
        for _ in range(max_tokens + 1):
            logits, state = self(token, state, **condition)
            logits = logits[:, -1] / temperature
            logits[:, [PAD_ID, BOS_ID]] = -torch.inf
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            probs = logits.softmax(-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).to(device)
            token = token.masked_fill(done[:, None], PAD_ID)
            rows.append(token)
            done |= token[:, 0] == EOS_ID
            if done.all():
                break
        return torch.cat(rows, dim=1)


def smoothed_targets(
    targets: torch.Tensor, vocab_size: int, label_smoothing: float
) -> torch.Tensor:
    """(N, V) probabilities: (1 - eps) one_hot(targets) + eps / V (eps = 0: one-hot)."""
    one_hot = F.one_hot(targets, vocab_size).to(torch.float32)
    return one_hot * (1 - label_smoothing) + label_smoothing / vocab_size


def next_token_terms(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    label_smoothing: float = 0.0,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The loss terms of a batch ``tokens`` (B, T), ``lengths`` (B,), given ``logits``
    (B, T, V) = the model's output on ``tokens``; position t predicts token t + 1.

    With ``project`` (e.g. the output layer), ``logits`` are the features (B, T, H) it maps to
    logits, and only the predicted positions are projected: the padding, often half of a
    batch of texts, then costs nothing in the largest layer (H x V).

    Returns per-sentence sums over the ``lengths - 1`` predicted tokens (pads excluded):
    ``kl`` (B,) the training loss KL(target || predicted) in nats, ``nll`` (B,) the
    negative log-likelihood (the one-hot cross-entropy) in nats, and ``tokens`` (B,) the number
    of predicted tokens (for the perplexity exp(sum nll / sum tokens)).
    """
    inputs_logits, targets = logits[:, :-1], tokens[:, 1:]
    mask = torch.arange(targets.shape[1], device=tokens.device) < (lengths[:, None] - 1)
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(targets)[mask]
    picked_logits, picked_targets = inputs_logits[mask], targets[mask]  # (N, V), (N,)
    if project is not None:
        picked_logits = project(picked_logits)
    # Validation off: the target is built right here, sums to 1 by construction.
    kl = KLDivergence(reduction="none", from_logits=True, validate=False)(
        predicted=picked_logits,
        target=smoothed_targets(picked_targets, picked_logits.shape[-1], label_smoothing),
    )
    nll = F.cross_entropy(picked_logits, picked_targets, reduction="none")
    zeros = logits.new_zeros(tokens.shape[0])
    return {
        "kl": zeros.index_add(0, rows, kl),
        "nll": zeros.index_add(0, rows, nll),
        "tokens": (lengths - 1).to(logits.dtype),
    }


def word_dropout(
    tokens: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``tokens`` (B, T) with each word (not ``<bos>``, ``<eos>`` or ``<pad>``) replaced by
    ``<unk>`` with ``probability`` (Bowman et al. 2016): the decoder's inputs, so that it must
    take what it drops from the latent. The targets stay the original tokens."""
    if probability <= 0:
        return tokens
    draws = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    words = (tokens != PAD_ID) & (tokens != BOS_ID) & (tokens != EOS_ID)
    return tokens.masked_fill(words & (draws < probability), UNK_ID)


class GRUSentenceEncoder(nn.Module):
    """q(z | sentence) = N(mu, diag exp(logvar)) from the GRU state after a sentence's last
    token (its ``<eos>``): Embedding -> GRU -> Linear(hidden_dim, 2 latent_dim). The GRU is
    causal and the state is read at position ``lengths - 1``, so padding changes nothing."""

    def __init__(
        self,
        vocab_size: int,
        latent_dim: int,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.gru = _gru(embed_dim, hidden_dim, num_layers, dropout)
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (B, latent_dim), of ``tokens`` (B, T) with ``lengths`` (B,)."""
        hidden, _ = self.gru(self.dropout(self.embedding(tokens)))
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.head(self.dropout(last)).chunk(2, dim=-1)


class LatentGRUDecoder(GRULanguageModel):
    """p(w_t | w_<t, z): the language model with z as its initial state (tanh(Linear(z)), one
    per layer) and concatenated to every input embedding, so z reaches each step directly."""

    def __init__(
        self,
        vocab_size: int,
        latent_dim: int,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(vocab_size, embed_dim, hidden_dim, num_layers, dropout, latent_dim)
        self.latent_to_state = nn.Linear(latent_dim, num_layers * hidden_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        state: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) given ``z`` (B, latent_dim), and the GRU state."""
        features, state = self.features(tokens, state, z)
        return self.output(features), state

    def features(
        self,
        tokens: torch.Tensor,
        state: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if z is None:
            raise ValueError("LatentGRUDecoder needs z, the latent of each sentence")
        if state is None:
            layers, hidden = self.gru.num_layers, self.gru.hidden_size
            state = torch.tanh(self.latent_to_state(z)).view(-1, layers, hidden)
            state = state.transpose(0, 1).contiguous()
        inputs = self.dropout(self.embedding(tokens))
        inputs = torch.cat([inputs, z[:, None].expand(-1, tokens.shape[1], -1)], dim=-1)
        hidden, state = self.gru(inputs, state)
        return self.dropout(hidden), state
