"""MNIST and Fashion-MNIST: 28x28 greyscale, 60000 official training and 10000 test images.

Where the files are looked for, in order (the first folder with all four files wins):

1. ``<root>/<Class>/raw`` -- torchvision's own layout (``Class`` is ``MNIST`` or
   ``FashionMNIST``), which is also where ``download=True`` puts them;
2. each folder in ``search_paths``; for Fashion-MNIST this defaults to
   ``/usr/share/datasets/fashion-mnist``, where the Debian package ``dataset-fashion-mnist``
   installs the original ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
   ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.

Each file may be uncompressed or ``.gz``; both are read in place (see ``vae.data.idx``), so
nothing is copied or extracted into ``root``. torchvision's dataset classes provide the
folder layout and the download. The official training set is split into train and a
seeded validation subset of ``val_size`` images; the official test set is the test split.
"""

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch
from torchvision import datasets

from vae.data.errors import DatasetNotFoundError
from vae.data.idx import IDXFormatError, read_idx
from vae.data.splits import ImageSplit, split_indices
from vae.data.tensor_datamodule import InMemoryDataModule, check_integer_setting

# The four original files, by role; the names torchvision's classes use (without ``.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
PIXEL_MAX = 255


def find_idx_files(folder: Path) -> dict[str, Path]:
    """The IDX files present in ``folder``, by role; an uncompressed file beats its ``.gz``."""
    found = {}
    for role, stem in IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
    return found


class IDXImageDataModule(InMemoryDataModule):
    """Base of the MNIST-format DataModules; subclasses name the torchvision class.

    Args (besides those of ``InMemoryDataModule``):
        val_size: images held out of the official training set for validation.
        download: let torchvision download the files into ``<root>/<Class>/raw`` in
            ``prepare_data()`` when no folder has them. Off by default: runs are offline.
        search_paths: folders searched after ``<root>/<Class>/raw``; ``None`` means the
            class's ``default_search_paths``.
    """

    torchvision_class: ClassVar[type[datasets.MNIST]]
    title: ClassVar[str]
    default_search_paths: ClassVar[tuple[str, ...]] = ()
    debian_package: ClassVar[str | None] = None
    image_shape = (1, 28, 28)
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
        search_paths: Iterable[str] | None = None,
        seed: int | None = None,
        pin_memory: bool | None = None,
        on_device: bool | None = None,
    ) -> None:
        self.val_size = check_integer_setting(
            val_size, "data.val_size", 1, "Set e.g. data.val_size=5000."
        )
        self.download = bool(download)
        paths = self.default_search_paths if search_paths is None else search_paths
        if isinstance(paths, str | Path):
            raise ValueError(f"search_paths must be a list of folders, got the string {paths!r}")
        self.search_paths = tuple(Path(p) for p in paths)
        super().__init__(
            root, batch_size, num_workers, binarize, split_seed, seed, pin_memory, on_device
        )

    @property
    def raw_folder(self) -> Path:
        """``<root>/<Class>/raw``: where torchvision keeps (and downloads) the files."""
        return Path(self.root) / self.torchvision_class.__name__ / "raw"

    def search_folders(self) -> list[Path]:
        return [self.raw_folder, *self.search_paths]

    def ways_to_get(self) -> str:
        ways = []
        if self.debian_package:
            ways.append(
                f"apt-get install {self.debian_package}  (installs the files in "
                f"{DEBIAN_FASHION_MNIST_DIR}; they are read in place)"
            )
        ways.append(
            f"put the four IDX files ({', '.join(IDX_FILES.values())}, plain or .gz) in "
            f"{self.raw_folder}, or set data.root to the folder that holds "
            f"{self.torchvision_class.__name__}/raw"
        )
        ways.append(
            f"when online: data.download=true (torchvision downloads them into {self.raw_folder})"
        )
        return "Ways to get it:\n" + "\n".join(f"  {i}. {way}" for i, way in enumerate(ways, 1))

    def locate_files(self) -> dict[str, Path]:
        """The four files from the first folder that has all of them.

        Raises ``DatasetNotFoundError`` listing each folder searched and what it holds.
        """
        report = []
        for folder in self.search_folders():
            found = find_idx_files(folder)
            if len(found) == len(IDX_FILES):
                if report and any("missing" in line for line in report):
                    warnings.warn(
                        f"Using {self.title} from {folder}; skipped incomplete folders:\n"
                        + "\n".join(report),
                        stacklevel=2,
                    )
                return found
            if found:
                missing = [IDX_FILES[role] for role in IDX_FILES if role not in found]
                report.append(f"  - {folder}: incomplete, missing {', '.join(missing)}")
            else:
                report.append(f"  - {folder}: no {self.title} files")
        download_note = ""
        if self.download:
            download_note = (
                "\ndata.download=true downloads in prepare_data(); outside Lightning call "
                "dm.prepare_data() before dm.setup()."
            )
        raise DatasetNotFoundError(
            f"{self.title} not found (data.root={self.root}). Searched:\n"
            + "\n".join(report)
            + f"\n{self.ways_to_get()}{download_note}"
        )

    def prepare_data(self) -> None:
        """Download if allowed and needed, then check that the files can be found."""
        if self.download and not len(find_idx_files(self.raw_folder)) == len(IDX_FILES):
            if not any(len(find_idx_files(f)) == len(IDX_FILES) for f in self.search_paths):
                self._download()
        self.locate_files()

    def _download(self) -> None:
        try:
            self.torchvision_class(self.root, train=True, download=True)
        except (RuntimeError, OSError) as error:  # URLError is an OSError
            raise DatasetNotFoundError(
                f"Downloading {self.title} into {self.raw_folder} (data.root={self.root}) "
                f"failed: {error}\n{self.ways_to_get()}"
            ) from error

    def _read_split(self, files: dict[str, Path], split: str) -> ImageSplit:
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        try:
            images, labels = read_idx(images_path), read_idx(labels_path)
        except IDXFormatError as error:
            raise DatasetNotFoundError(
                f"{self.title} file is unusable (data.root={self.root}): {error}. "
                f"Delete it and get it again.\n{self.ways_to_get()}"
            ) from error
        if images.dim() != 3 or tuple(images.shape[1:]) != self.image_shape[1:]:
            raise DatasetNotFoundError(
                f"{images_path} holds an array of shape {tuple(images.shape)}, not (N, 28, 28) "
                f"images (data.root={self.root}).\n{self.ways_to_get()}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetNotFoundError(
                f"{labels_path} holds shape {tuple(labels.shape)} but {images_path} holds "
                f"{images.shape[0]} images; the files do not belong together "
                f"(data.root={self.root}).\n{self.ways_to_get()}"
            )
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise DatasetNotFoundError(
                f"{labels_path} holds label {int(labels.max())}, outside 0..{self.num_classes - 1} "
                f"(data.root={self.root}).\n{self.ways_to_get()}"
            )
        intensities = images.unsqueeze(1).to(torch.float32) / PIXEL_MAX
        return ImageSplit(intensities, labels.to(torch.int64))

    def load_splits(self) -> tuple[ImageSplit, ImageSplit, ImageSplit]:
        files = self.locate_files()
        official_train = self._read_split(files, "train")
        test = self._read_split(files, "test")
        if self.val_size >= len(official_train):
            raise ValueError(
                f"data.val_size={self.val_size} leaves no training images: the training set has "
                f"{len(official_train)}; choose data.val_size below that (e.g. 5000)."
            )
        train_index, val_index = split_indices(
            len(official_train), (self.val_size,), self.split_seed
        )
        return official_train.subset(train_index), official_train.subset(val_index), test


class MNISTDataModule(IDXImageDataModule):
    """MNIST handwritten digits, read from ``<root>/MNIST/raw`` (no Debian package ships it)."""

    name = "mnist"
    title = "MNIST"
    torchvision_class = datasets.MNIST


class FashionMNISTDataModule(IDXImageDataModule):
    """Fashion-MNIST, from ``<root>/FashionMNIST/raw`` or the Debian package's folder."""

    name = "fashion_mnist"
    title = "Fashion-MNIST"
    torchvision_class = datasets.FashionMNIST
    default_search_paths = (DEBIAN_FASHION_MNIST_DIR,)
    debian_package = "dataset-fashion-mnist"
