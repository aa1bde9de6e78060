"""``InMemoryDataModule``: the base of every image DataModule in ``vae.data``.

A subclass only says how to read its data (``load_splits``) and states ``name``,
``image_shape`` and ``num_classes`` as class attributes, so a model can be built from
``image_shape`` before any file is read. This base validates the common settings, binarizes
(see ``vae.data.binarize``), and serves ``(x, y)`` batches: ``x`` float32 (B, C, H, W) in
[0, 1] (exactly 0 or 1 when binarized), ``y`` int64 (B,).

Random streams, each keyed by its own seed (``vae.data.seeds``):

- the train/val/test split: ``split_seed`` (default 0), independent of the training seed;
- the fixed binarization (static train; val and test under both static and dynamic):
  ``split_seed`` and the split's name, so it is the same in every run;
- the shuffle order of epoch ``e``: ``(seed, e)``, and dynamic binarization of training
  batches: ``seed``. ``seed`` defaults to ``torch.initial_seed()`` read when
  ``train_dataloader()`` is called, which is the global seed after ``L.seed_everything``.
"""

from abc import abstractmethod
from typing import ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from vae.data.batching import (
    EpochShuffleSampler,
    ImageTensorDataset,
    ResumableDataLoader,
    keep_batch,
)
from vae.data.binarize import check_binarize_mode, sample_binary
from vae.data.seeds import BINARIZE_FIXED_STREAM, WORKER_STREAM, seeded_generator
from vae.data.splits import ImageSplit

# Keys for the fixed binarization of each split, and which splits get it in each mode.
_SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}
_FIXED_BINARIZATION = {"none": (), "static": ("train", "val", "test"), "dynamic": ("val", "test")}


def check_integer_setting(value: object, key: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}. {hint}")
    return value


class InMemoryDataModule(L.LightningDataModule):
    """Train/val/test images held as tensors in memory, served a whole batch per gather.

    Args:
        root: folder for dataset files (Hydra key ``data.root``); unused by embedded sets.
        batch_size: examples per batch, for all three splits.
        num_workers: DataLoader worker processes. 0 (default) is usually fastest here,
            because a batch is a single tensor gather.
        binarize: ``"none"``, ``"static"`` or ``"dynamic"`` (see ``vae.data.binarize``).
        split_seed: seed of the train/val/test split and of the fixed binarization.
        seed: seed of the shuffle order and dynamic binarization; ``None`` means
            ``torch.initial_seed()`` when ``train_dataloader()`` is called.
        pin_memory: pin batches for faster host-to-GPU copies; ``None`` means "if the trainer
            trains on a CUDA device" (without a trainer: if CUDA is available). A CPU run on a
            GPU machine then does not pin (and copy) every batch for nothing.
        on_device: keep the splits in the training device's memory (``data.on_device``), so a
            batch is one gather on the GPU and no image crosses the host-to-device link.
            ``None`` (default) means "when the trainer trains on a CUDA device and
            ``num_workers`` is 0"; ``False`` keeps them on the host. See ``serving_device``.
    """

    name: ClassVar[str]
    image_shape: ClassVar[tuple[int, int, int]]  # (C, H, W), known before any data is read
    num_classes: ClassVar[int]
    # Distinct intensity levels of the raw pixels, served as k / (levels - 1) in [0, 1]:
    # 17 for the digits (0..16), 256 for 8-bit images. See ``num_levels``.
    intensity_levels: ClassVar[int] = 256

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        binarize: str = "none",
        split_seed: int = 0,
        seed: int | None = None,
        pin_memory: bool | None = None,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        self.root = str(root)
        self.batch_size = check_integer_setting(
            batch_size, "data.batch_size", 1, "Set e.g. data.batch_size=64."
        )
        self.num_workers = check_integer_setting(
            num_workers, "data.num_workers", 0, "Use 0 to load in the main process."
        )
        self.binarize = check_binarize_mode(binarize)
        self.split_seed = check_integer_setting(
            split_seed, "data.split_seed", 0, "Set e.g. data.split_seed=0."
        )
        if seed is not None:
            check_integer_setting(seed, "data.seed", 0, "Leave it unset to use the global seed.")
        self.seed = seed
        self._pin_memory = None if pin_memory is None else bool(pin_memory)
        if on_device is not None and not isinstance(on_device, bool):
            raise ValueError(f"data.on_device must be true, false or null, got {on_device!r}")
        if on_device and self.num_workers > 0:
            raise ValueError(
                f"data.on_device=true serves batches from device memory in the main process, "
                f"but data.num_workers={self.num_workers}: set data.num_workers=0"
            )
        self.on_device = on_device
        self._resume_position: tuple[int, int] | None = None
        self.train_split: ImageSplit | None = None
        self.val_split: ImageSplit | None = None
        self.test_split: ImageSplit | None = None
        # Collects the init arguments of the subclass too, for the checkpoint. Not sent to the
        # logger: the run logs its whole flattened config once (vae.training.tensorboard.log_hparams),
        # and a second hparams record would compete for the HParams tab.
        self.save_hyperparameters(logger=False)

    @property
    def num_levels(self) -> int:
        """Distinct values a pixel can take in the batches served: 2 when binarized, else the
        raw ``intensity_levels``. Known before any data is read; the model uses it to turn a
        density into bits/dim comparable with discrete likelihoods (uniform dequantization)."""
        return 2 if self.binarize != "none" else self.intensity_levels

    @abstractmethod
    def load_splits(self) -> tuple[ImageSplit, ImageSplit, ImageSplit]:
        """Read the data and return ``(train, val, test)`` intensities in [0, 1].

        Raise ``DatasetNotFoundError`` when the data is missing or unusable.
        """

    def setup(self, stage: str | None = None) -> None:
        """Load and binarize all three splits once; later calls do nothing."""
        if self.train_split is not None:
            return
        splits = dict(zip(("train", "val", "test"), self.load_splits(), strict=True))
        for split_name, split in splits.items():
            if tuple(split.images.shape[1:]) != tuple(self.image_shape):
                raise ValueError(
                    f"{type(self).__name__}.load_splits returned {split_name} images of shape "
                    f"{tuple(split.images.shape[1:])}, but image_shape is {self.image_shape}"
                )
        for split_name in _FIXED_BINARIZATION[self.binarize]:
            splits[split_name] = self._fixed_binarization(split_name, splits[split_name])
        self.train_split, self.val_split, self.test_split = (
            splits["train"],
            splits["val"],
            splits["test"],
        )

    def _fixed_binarization(self, split_name: str, split: ImageSplit) -> ImageSplit:
        generator = seeded_generator(
            BINARIZE_FIXED_STREAM, self.split_seed, _SPLIT_KEYS[split_name]
        )
        # The grey images of a held-out split stay, for display (val/reconstructions); the
        # train split's would double the memory of the largest split for nothing.
        intensities = None if split_name == "train" else split.images
        return ImageSplit(sample_binary(split.images, generator), split.labels, intensities)

    def _require_setup(self) -> None:
        if self.train_split is None:
            raise RuntimeError(
                f"{type(self).__name__}.setup() must run before asking for a dataloader; "
                "Lightning calls it for you, outside Lightning call dm.prepare_data(); dm.setup()."
            )

    @property
    def pin_memory(self) -> bool:
        """Whether the loaders pin batches (see the ``pin_memory`` argument); never when the
        splits are already on the device."""
        if self.serving_device.type != "cpu":
            return False
        if self._pin_memory is not None:
            return self._pin_memory
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    @property
    def serving_device(self) -> torch.device:
        """Where the batches are gathered: the trainer's device (this process's GPU under DDP)
        when ``on_device`` is true, or is ``None`` with a CUDA trainer and no workers; else the
        CPU. Without a trainer: the CPU.

        On a CUDA device the dynamic binarization draws from a CUDA generator with the same
        seeds, which gives other (equally reproducible and resumable) noise than on the host."""
        device = None if self.trainer is None else self.trainer.strategy.root_device
        if device is None or self.on_device is False:
            return torch.device("cpu")
        if self.on_device is None and (device.type != "cuda" or self.num_workers > 0):
            return torch.device("cpu")
        return device

    def _dataset(self, split: ImageSplit, **kwargs) -> ImageTensorDataset:
        """The split's images and labels, on ``serving_device`` (one copy per dataloader)."""
        device = self.serving_device
        return ImageTensorDataset(split.images.to(device), split.labels.to(device), **kwargs)

    def _loader(self, dataset: ImageTensorDataset, sampler: Sampler[int], seed: int) -> DataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # Seeds the workers' base seed and keeps the global RNG untouched by iteration.
            generator=seeded_generator(WORKER_STREAM, seed),
        )

    def resolved_seed(self) -> int:
        """The seed of shuffling and dynamic binarization: ``seed``, else ``torch.initial_seed()``."""
        return self.seed if self.seed is not None else torch.initial_seed()

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        seed = self.resolved_seed()
        split = self.train_split
        dataset = self._dataset(
            split,
            resample_seed=seed if self.binarize == "dynamic" else None,
            process_rank=self.trainer.global_rank if self.trainer is not None else 0,
        )
        sampler = EpochShuffleSampler(len(split), seed, on_epoch=dataset.start_epoch)
        if self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        return self._loader(dataset, sampler, seed)

    # --- mid-epoch resume: where in the epoch a checkpoint was taken ------------------------
    def state_dict(self) -> dict:
        """Saved in checkpoints: the epoch and the training batches already processed in it."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        examples_done = progress.processed * self.batch_size
        return {"epoch": trainer.current_epoch, "examples_done": examples_done}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the epoch after the examples it had done."""
        if state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["examples_done"]))

    def _eval_loader(self, split: ImageSplit | None) -> DataLoader:
        self._require_setup()
        dataset = self._dataset(split)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Each example once, on one process: Lightning's DistributedSampler would repeat
            # examples to even the shares and bias the validation means.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        else:
            sampler = SequentialSampler(dataset)
        return self._loader(dataset, sampler, self.resolved_seed())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_split)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_split)
