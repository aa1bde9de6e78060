"""Seeds derived from several integers, so that each random stream has its own seed.

Adding small integers to a seed (``seed + epoch``) makes streams overlap: run 1's epoch 2
would use run 2's epoch 1 permutation. Hashing the tuple with NumPy's ``SeedSequence``
gives well separated 63-bit seeds instead.
"""

import numpy as np
import torch

# Tags that keep the data streams apart even when they are keyed by the same seed.
SPLIT_STREAM = 0
BINARIZE_FIXED_STREAM = 1
BINARIZE_TRAIN_STREAM = 2
SHUFFLE_STREAM = 3
WORKER_STREAM = 4


def derive_seed(*keys: int) -> int:
    """Return a seed in [0, 2**63) that is a fixed function of the integers ``keys``."""
    if not keys or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in keys):
        raise ValueError(f"keys must be non-negative integers, got {keys!r}")
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*keys)``. The same seed
    gives other numbers on a CUDA device (Philox) than on the CPU (Mersenne Twister)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))
