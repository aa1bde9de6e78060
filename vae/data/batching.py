"""Fast batches from tensors held in memory: one indexing operation per batch.

A ``DataLoader`` over a map-style dataset normally calls ``dataset[i]`` once per example and
stacks the results, which costs more than a small model's forward pass. ``ImageTensorDataset``
implements ``__getitems__``, so the ``DataLoader`` hands it the batch's whole index list and
it answers with ``(images[idx], labels[idx])`` in one gather. ``keep_batch`` is then the
collate function: the batch is already stacked.

The sampler stays a plain per-example ``Sampler`` wrapped by the ``DataLoader``'s own
``BatchSampler``. That is the shape Lightning knows how to re-shard under DDP (it swaps in a
``DistributedSampler`` and keeps ``__getitems__``), so multi-GPU runs need no special case.
"""

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from vae.data.binarize import sample_binary
from vae.data.seeds import BINARIZE_TRAIN_STREAM, SHUFFLE_STREAM, seeded_generator


class EpochShuffleSampler(Sampler[int]):
    """Yields ``0 .. num_examples - 1`` in an order that depends only on ``(seed, epoch)``.

    Epoch ``e`` uses ``torch.randperm`` under the generator seeded with
    ``derive_seed(SHUFFLE_STREAM, seed, e)``, so a run's data order is reproducible and
    epoch ``e``'s order can be rebuilt without replaying epochs ``0 .. e - 1`` (for resume).

    Lightning calls ``set_epoch(current_epoch)`` before each training epoch. Without
    Lightning, each ``iter()`` moves to the next epoch by itself, so a plain loop also gets a
    fresh order every epoch.
    """

    def __init__(
        self,
        num_examples: int,
        seed: int,
        shuffle: bool = True,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        # Told the epoch whenever one starts (the dataset re-keys its binarization noise).
        self.on_epoch = on_epoch
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, examples_done: int) -> None:
        """Make epoch ``epoch`` start after its first ``examples_done`` examples (mid-epoch resume)."""
        self._resume = (epoch, examples_done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of example indices used in ``epoch`` (int64, shape (N,))."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = seeded_generator(SHUFFLE_STREAM, self.seed, epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
        self._resume = None
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.num_examples


class ImageTensorDataset(Dataset):
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64, served a batch at a time,
    gathered (and binarized) on the device the tensors live on.

    With ``resample_seed`` set, every batch is a fresh ``Bernoulli(images[idx])`` draw
    (dynamic binarization). The draws come from a generator seeded with
    ``(BINARIZE_TRAIN_STREAM, resample_seed, process_rank)`` in the main process, plus the
    worker's seed inside a DataLoader worker (the DataLoader derives it from its own seeded
    generator). The rank keeps DDP processes from drawing the same noise for their
    different examples. A fresh run with the same seed, ``num_workers`` and number of
    processes sees the same binary images.

    In the main process (``num_workers=0``, the default) the sampler calls
    :meth:`start_epoch` as each epoch begins, and each batch's noise is drawn from a generator
    keyed by ``(seed, rank, epoch, first example of the batch)``: a run resumed at any batch
    draws exactly the noise of an uninterrupted run. Worker processes keep one stream per
    worker (their copy of the dataset does not see the epoch).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        resample_seed: int | None = None,
        process_rank: int = 0,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images and labels must have the same length, got {images.shape[0]} "
                f"and {labels.shape[0]}"
            )
        self.images = images
        self.labels = labels
        self.resample_seed = resample_seed
        self.process_rank = process_rank
        self._generator: torch.Generator | None = None
        self._generator_key: int | None = None
        self._epoch: int | None = None

    def start_epoch(self, epoch: int) -> None:
        """Re-key the main-process binarization stream with ``epoch`` (see the class doc)."""
        self._epoch = epoch
        self._generator = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _binarize_generator(self) -> torch.Generator:
        worker = get_worker_info()
        # -1 marks the main process; worker seeds are non-negative.
        key = -1 if worker is None else worker.seed % (2**63)
        if self._generator is None or self._generator_key != key:
            assert self.resample_seed is not None
            keys = (self.resample_seed, self.process_rank)
            if worker is not None:
                keys += (key,)
            elif self._epoch is not None:
                keys += (self._epoch,)
            self._generator = seeded_generator(
                BINARIZE_TRAIN_STREAM, *keys, device=self.images.device
            )
            self._generator_key = key
        return self._generator

    def _maybe_binarize(self, images: torch.Tensor, first_index: int | None = None) -> torch.Tensor:
        if self.resample_seed is None:
            return images
        if first_index is not None and self._epoch is not None and get_worker_info() is None:
            # Each batch's noise is a function of (seed, rank, epoch, its first example), so a
            # run resumed mid-epoch draws exactly what the uninterrupted run drew.
            generator = seeded_generator(
                BINARIZE_TRAIN_STREAM,
                self.resample_seed,
                self.process_rank,
                self._epoch,
                first_index,
                device=self.images.device,
            )
            return sample_binary(images, generator)
        return sample_binary(images, self._binarize_generator())

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one gather (the DataLoader passes the batch's indices)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        first = int(indices[0]) if len(indices) else None
        return self._maybe_binarize(self.images[index], first), self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._maybe_binarize(self.images[index]), self.labels[index]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning treats as resumable mid-epoch.

    The position itself travels in the DataModule's ``state_dict`` (the trainer's count of
    processed batches, which unlike the loader knows nothing of prefetching) and reaches the
    sampler through :meth:`EpochShuffleSampler.resume_at`; these methods only declare the
    loader stateful so that Lightning does not warn that it is not.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for ``ImageTensorDataset``: ``__getitems__`` already built the batch."""
    return batch
