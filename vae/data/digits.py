"""scikit-learn's 8x8 handwritten digits: the default dataset, shipped with scikit-learn.

1797 greyscale images with integer intensities 0..16 (each pixel counts the set pixels of a
4x4 block of a 32x32 bitmap), scaled here to [0, 1] by dividing by 16. Small enough that a
VAE trains on it in seconds on a CPU, so the default experiment needs no download.
"""

import torch
from sklearn.datasets import load_digits

from vae.data.splits import ImageSplit, split_indices
from vae.data.tensor_datamodule import InMemoryDataModule, check_integer_setting

DIGITS_MAX_INTENSITY = 16
NUM_DIGITS = 1797


def load_digit_images() -> ImageSplit:
    """All 1797 digits: images float32 (1797, 1, 8, 8) in [0, 1], labels int64 (1797,)."""
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / DIGITS_MAX_INTENSITY
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return ImageSplit(images.unsqueeze(1).contiguous(), labels)


class DigitsDataModule(InMemoryDataModule):
    """The digits, split at random into train / val / test (1437 / 180 / 180 by default).

    The split depends only on ``split_seed``. ``root`` is accepted so that every data config
    has the same keys, and ignored: the data ships with scikit-learn.
    """

    name = "digits"
    image_shape = (1, 8, 8)
    num_classes = 10
    intensity_levels = DIGITS_MAX_INTENSITY + 1

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        binarize: str = "none",
        val_size: int = 180,
        test_size: int = 180,
        split_seed: int = 0,
        seed: int | None = None,
        pin_memory: bool | None = None,
        on_device: bool | None = None,
    ) -> None:
        hint = f"The two held-out sets must leave training examples out of {NUM_DIGITS}."
        self.val_size = check_integer_setting(val_size, "data.val_size", 1, hint)
        self.test_size = check_integer_setting(test_size, "data.test_size", 1, hint)
        if val_size + test_size >= NUM_DIGITS:
            raise ValueError(
                f"data.val_size + data.test_size = {val_size + test_size} leaves no training "
                f"examples out of {NUM_DIGITS}; use e.g. data.val_size=180 data.test_size=180."
            )
        super().__init__(
            root, batch_size, num_workers, binarize, split_seed, seed, pin_memory, on_device
        )

    def load_splits(self) -> tuple[ImageSplit, ImageSplit, ImageSplit]:
        everything = load_digit_images()
        train, val, test = split_indices(
            len(everything), (self.val_size, self.test_size), self.split_seed
        )
        return everything.subset(train), everything.subset(val), everything.subset(test)
