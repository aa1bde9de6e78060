"""CIFAR-10: 32x32 RGB, 50000 official training and 10000 test images, via torchvision.

torchvision's ``CIFAR10`` reads the "python version" pickles from
``<root>/cifar-10-batches-py`` and checks each file's MD5, so a partial or damaged copy is
caught there; we turn its error into ``DatasetNotFoundError``. Held as float32 the whole set
takes 60000 x 3072 x 4 bytes = 737 MB of host memory.
"""

import pickle
from pathlib import Path

import torch
from torchvision import datasets

from vae.data.errors import DatasetNotFoundError
from vae.data.splits import ImageSplit, split_indices
from vae.data.tensor_datamodule import InMemoryDataModule, check_integer_setting

PIXEL_MAX = 255


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10 with a seeded validation subset of ``val_size`` held out of the training set.

    ``download=True`` lets torchvision download and extract the 163 MB archive into ``root``
    in ``prepare_data()``; off by default because runs are offline.
    """

    name = "cifar10"
    image_shape = (3, 32, 32)
    num_classes = 10

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        binarize: str = "none",
        val_size: int = 5000,
        split_seed: int = 0,
        download: bool = False,
        seed: int | None = None,
        pin_memory: bool | None = None,
        on_device: bool | None = None,
    ) -> None:
        self.val_size = check_integer_setting(
            val_size, "data.val_size", 1, "Set e.g. data.val_size=5000."
        )
        self.download = bool(download)
        super().__init__(
            root, batch_size, num_workers, binarize, split_seed, seed, pin_memory, on_device
        )

    @property
    def folder(self) -> Path:
        return Path(self.root) / datasets.CIFAR10.base_folder

    def ways_to_get(self) -> str:
        return (
            "Ways to get it:\n"
            f"  1. extract the python version, {datasets.CIFAR10.filename} "
            f"({datasets.CIFAR10.url}), into {self.root} so that {self.folder} holds "
            "data_batch_1..5, test_batch and batches.meta, or set data.root to the folder "
            f"that holds {datasets.CIFAR10.base_folder}\n"
            f"  2. when online: data.download=true (torchvision downloads it into {self.root})"
        )

    def _open(self, train: bool, download: bool = False) -> datasets.CIFAR10:
        if not download and not self.folder.is_dir():
            raise DatasetNotFoundError(
                f"CIFAR-10 not found: {self.folder} does not exist (data.root={self.root}).\n"
                + self.ways_to_get()
            )
        try:
            return datasets.CIFAR10(self.root, train=train, download=download)
        except (RuntimeError, OSError, pickle.UnpicklingError, EOFError) as error:
            action = "Downloading" if download else "Reading"
            raise DatasetNotFoundError(
                f"{action} CIFAR-10 in {self.folder} (data.root={self.root}) failed: {error}. "
                "torchvision checks every file's MD5, so a partial or damaged copy fails here; "
                f"delete the folder and get it again.\n{self.ways_to_get()}"
            ) from error

    def prepare_data(self) -> None:
        """Download if allowed, then check that the files are present and intact."""
        self._open(train=False, download=self.download)

    def _read_split(self, train: bool) -> ImageSplit:
        dataset = self._open(train)
        # torchvision holds (N, H, W, C) uint8; we want (N, C, H, W) in [0, 1].
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).to(torch.float32) / PIXEL_MAX
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
        return ImageSplit(images.contiguous(), labels)

    def load_splits(self) -> tuple[ImageSplit, ImageSplit, ImageSplit]:
        official_train, test = self._read_split(train=True), self._read_split(train=False)
        if self.val_size >= len(official_train):
            raise ValueError(
                f"data.val_size={self.val_size} leaves no training images: the training set has "
                f"{len(official_train)}; choose data.val_size below that (e.g. 5000)."
            )
        train_index, val_index = split_indices(
            len(official_train), (self.val_size,), self.split_seed
        )
        return official_train.subset(train_index), official_train.subset(val_index), test
