"""An autoregressive prior over a grid of VQ codes: a small causal transformer.

The h x w grid of code indices is read in raster order c_1 .. c_L (L = h * w) and modelled as

    p(c) = prod_t p(c_t | c_<t),

each factor a softmax over the K codes. The input sequence is the codes shifted right by one
behind a start token, so position t only sees c_<t: a causal attention mask makes this exact
(no blind spots, unlike a masked-convolution PixelCNN). With L of a few dozen positions, as
for 28x28 images on a 7x7 grid, a few layers are enough and full attention is cheap.

``nll(indices)`` is -log p(c) in nats per example (summed over the L positions), the rate of
the VQ-VAE under this prior.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.nn.validation import positive_int


class CodePrior(nn.Module):
    """Causal transformer over code grids of shape ``grid_shape``.

    Args:
        num_codes: K, the codebook size of the VQ-VAE.
        grid_shape: (h, w) of the code grid.
        dim: width of the transformer.
        depth: number of layers.
        heads: attention heads; must divide ``dim``.
        dropout: dropout inside the layers, in [0, 1).
    """

    def __init__(
        self,
        num_codes: int,
        grid_shape: Sequence[int],
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_codes = positive_int(num_codes, "CodePrior", "num_codes")
        if len(grid_shape) != 2:
            raise ValueError(
                f"CodePrior: argument 'grid_shape' must be (height, width), "
                f"got {tuple(grid_shape)}."
            )
        self.grid_shape = (
            positive_int(grid_shape[0], "CodePrior", "grid_shape[0]"),
            positive_int(grid_shape[1], "CodePrior", "grid_shape[1]"),
        )
        self.length = self.grid_shape[0] * self.grid_shape[1]
        dim = positive_int(dim, "CodePrior", "dim")
        depth = positive_int(depth, "CodePrior", "depth")
        heads = positive_int(heads, "CodePrior", "heads")
        if dim % heads:
            raise ValueError(
                f"CodePrior: argument 'dim' ({dim}) must be divisible by argument 'heads' "
                f"({heads})."
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"CodePrior: argument 'dropout' must be in [0, 1), got {dropout}.")
        self.start_token = self.num_codes  # one extra embedding row
        self.token_embedding = nn.Embedding(self.num_codes + 1, dim)
        self.position_embedding = nn.Parameter(torch.zeros(self.length, dim))
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.num_codes)
        self.register_buffer(
            "causal_mask",
            nn.Transformer.generate_square_subsequent_mask(self.length),
            persistent=False,
        )

    def _check_indices(self, indices: Tensor) -> Tensor:
        if indices.dim() != 3 or tuple(indices.shape[1:]) != self.grid_shape:
            raise ValueError(
                f"indices must be a code grid (batch, {self.grid_shape[0]}, {self.grid_shape[1]}), "
                f"got {tuple(indices.shape)}."
            )
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be integer code indices, got {indices.dtype}.")
        return indices.reshape(indices.shape[0], self.length).long()

    def _logits_of_sequence(self, inputs: Tensor) -> Tensor:
        """Next-code logits (B, T, K) for input tokens (B, T), T <= L, start token first."""
        length = inputs.shape[1]
        hidden = self.token_embedding(inputs) + self.position_embedding[:length]
        mask = self.causal_mask[:length, :length]
        hidden = self.layers(hidden, mask=mask, is_causal=True)
        return self.head(self.norm(hidden))

    def forward(self, indices: Tensor) -> Tensor:
        """Logits (B, K, h, w): at each position, of p(c_t | c_<t) in raster order."""
        sequence = self._check_indices(indices)
        start = torch.full_like(sequence[:, :1], self.start_token)
        logits = self._logits_of_sequence(torch.cat([start, sequence[:, :-1]], dim=1))
        return logits.transpose(1, 2).reshape(indices.shape[0], self.num_codes, *self.grid_shape)

    def nll(self, indices: Tensor) -> Tensor:
        """-log p(indices) in nats per example, shape (B,)."""
        logits = self(indices).float()
        per_position = F.cross_entropy(logits, indices.long(), reduction="none")
        return per_position.reshape(indices.shape[0], -1).sum(1)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Code grids (num_samples, h, w) drawn position by position from p(c_t | c_<t)."""
        num_samples = positive_int(num_samples, "CodePrior.sample", "num_samples")
        if not temperature > 0:
            raise ValueError(
                f"CodePrior.sample: argument 'temperature' must be > 0, got {temperature}."
            )
        device = self.position_embedding.device
        tokens = torch.full((num_samples, 1), self.start_token, dtype=torch.long, device=device)
        for _ in range(self.length):
            logits = self._logits_of_sequence(tokens)[:, -1].float() / temperature
            probabilities = torch.softmax(logits, dim=-1)
            next_code = torch.multinomial(probabilities, 1, generator=generator)
            tokens = torch.cat([tokens, next_code], dim=1)
        return tokens[:, 1:].reshape(num_samples, *self.grid_shape)
