"""LightningDataModules for images held in memory as float32 (N, C, H, W) tensors in [0, 1].

Every DataModule yields ``(x, y)`` batches (``x`` float32 (B, C, H, W), ``y`` int64 (B,)),
takes ``binarize="none" | "static" | "dynamic"`` (see ``vae.data.binarize``), and exposes
``name``, ``image_shape`` (C, H, W) and ``num_classes`` before any data is read.

- ``DigitsDataModule``: scikit-learn's 8x8 digits, embedded; the default.
- ``MNISTDataModule``, ``FashionMNISTDataModule``: IDX files from ``data.root`` (and, for
  Fashion-MNIST, the Debian package ``dataset-fashion-mnist``), read in place.
- ``CIFAR10DataModule``: torchvision's CIFAR-10 pickles from ``data.root``.
- ``FortunesDataModule``: text, ``(tokens, lengths)`` batches from the Debian package
  ``fortunes`` (see ``vae.data.fortunes``).

Missing or unusable files raise ``DatasetNotFoundError`` with the ways to get them.
"""

from vae.data.binarize import BINARIZE_MODES
from vae.data.cifar import CIFAR10DataModule
from vae.data.digits import DigitsDataModule
from vae.data.errors import DatasetNotFoundError
from vae.data.fortunes import FortunesDataModule, Vocabulary
from vae.data.mnist import FashionMNISTDataModule, IDXImageDataModule, MNISTDataModule
from vae.data.splits import ImageSplit
from vae.data.tensor_datamodule import InMemoryDataModule

__all__ = [
    "BINARIZE_MODES",
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "FortunesDataModule",
    "IDXImageDataModule",
    "ImageSplit",
    "InMemoryDataModule",
    "MNISTDataModule",
    "Vocabulary",
]
