"""What the Images tab shows: grids large enough to read, grey originals above decoder means,
the KL of each latent dimension in place, the code histogram with axes. Read back from the
event files with TensorBoard's own reader and looked at pixel by pixel."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torchvision.utils import make_grid

from tests.cli import load_events
from vae.data import DigitsDataModule
from vae.losses import gaussian_kl
from vae.models import GaussianVAE
from vae.models.vqvae import code_histogram_image
from vae.training import tags
from vae.training.tensorboard import BAR_COLOUR, MIN_GRID_WIDTH, bar_chart, image_grid

PIXEL = 1 / 255 + 1e-6  # an image summary stores 8-bit pixels


def decoded(event) -> torch.Tensor:
    """(3, H, W) in [0, 1] from an image event of TensorBoard's reader."""
    array = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def bars(image: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first column, end column, height in pixels) of each bar of a ``bar_chart``, left to right."""
    mask = ((image - torch.tensor(BAR_COLOUR).view(3, 1, 1)).abs() < 0.06).all(0)
    heights = mask.sum(0).tolist() + [0]
    found, start = [], None
    for column, height in enumerate(heights):
        if height and start is None:
            start = column
        elif not height and start is not None:
            found.append((start, column, max(heights[start:column])))
            start = None
    return found


# --- units ------------------------------------------------------------------------------------


def test_small_grids_are_enlarged_by_whole_pixels():
    digits = torch.rand(64, 1, 8, 8)
    grid = image_grid(digits)  # 8 per row: 73 pixels wide before
    plain = make_grid(digits, nrow=8, padding=1, pad_value=1.0)
    assert plain.shape[-1] == 73 and grid.shape[-1] == 4 * 73 >= MIN_GRID_WIDTH
    torch.testing.assert_close(grid[:, ::4, ::4], plain, rtol=0, atol=0)  # nearest neighbour
    torch.testing.assert_close(grid[:, 3::4, 3::4], plain, rtol=0, atol=0)
    assert image_grid(torch.rand(64, 3, 32, 32)).shape[-1] == 8 * 33 + 1  # wide enough already


def test_kl_chart_keeps_each_dimension_in_its_place():
    (left, right) = bars(bar_chart([1.0, 0.0, 0.0, 2.0], "latent dimension", "KL"))
    assert right[2] == pytest.approx(2 * left[2], rel=0.03)  # linear axis from 0
    pitch = (left[1] - left[0]) / 0.8  # bars are 0.8 of a slot wide
    assert right[0] - left[0] == pytest.approx(3 * pitch, abs=2)  # dimension 3, not 1


def test_code_histogram_has_sorted_log_scaled_bars_and_axes():
    image = code_histogram_image(torch.tensor([0.0, 99.0, 9.0, 0.0, 1.0]))
    assert image.shape[0] == 3 and image.shape[-1] >= MIN_GRID_WIDTH
    found = bars(image)
    assert len(found) == 3  # two unused codes: no bar
    first, second, third = (height for _, _, height in found)
    assert first > second > third > 0  # most used left
    # Log axis: bar tops at log(99), log(9), log(1) above a common base.
    assert (first - third) / (second - third) == pytest.approx(np.log(99) / np.log(9), rel=0.05)
    text = (image < 0.3).all(0)  # black: tick labels, axis labels, title
    assert text[:, : found[0][0]].any(), "no y axis labels left of the bars"
    bars_bottom = int(
        ((image - torch.tensor(BAR_COLOUR).view(3, 1, 1)).abs() < 0.06).all(0).nonzero()[:, 0].max()
    )
    assert text[bars_bottom + 1 :, :].any(), "no x axis labels below the bars"


# --- a real fit -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs of a Gaussian VAE on dynamically binarised digits: (run dir, model, data)."""
    run_dir = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    data = DigitsDataModule(binarize="dynamic")
    data.setup("fit")
    model = GaussianVAE(data.image_shape, data_levels=data.num_levels, num_images=32)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=TensorBoardLogger(run_dir, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return run_dir, model.eval(), data


def test_reconstructions_show_grey_originals_above_decoder_means(fitted):
    run_dir, model, data = fitted
    events = load_events(run_dir)
    image = decoded(events.Images(tags.VAL_RECONSTRUCTIONS)[-1])
    # 16 originals per row, then their 16 reconstructions: 16 * 9 + 1 = 145 pixels, enlarged.
    factor = image.shape[-1] // 145
    assert image.shape[-1] == 145 * factor >= MIN_GRID_WIDTH

    def cell(row: int, column: int) -> torch.Tensor:
        top, left = factor * (1 + 9 * row), factor * (1 + 9 * column)
        return image[0, top : top + 8 * factor : factor, left : left + 8 * factor : factor]

    split = data.val_split
    grey, binary = split.intensities[0, 0], split.images[0, 0]
    assert not torch.equal(grey, binary) and ((grey > 0.05) & (grey < 0.95)).any()
    torch.testing.assert_close(cell(0, 0), grey, rtol=0, atol=PIXEL)  # not the 0/1 draw
    with torch.no_grad():
        mean = model.reconstruct(split.images[:1])[0, 0]  # sigmoid of the logits
    assert ((mean > 0.05) & (mean < 0.95)).any()
    torch.testing.assert_close(cell(1, 0), mean, rtol=0, atol=PIXEL)
    samples = events.Images(tags.VAL_SAMPLES)[-1]
    assert samples.width >= MIN_GRID_WIDTH


def test_kl_per_dimension_chart_each_validation_with_each_dimension_in_place(fitted):
    run_dir, model, data = fitted
    events = load_events(run_dir)
    charts = events.Images(tags.VAL_KL_PER_DIM_CHART)
    histograms = events.Histograms(tags.VAL_KL_PER_DIM)
    assert [c.step for c in charts] == [h.step for h in histograms] == [3, 6]
    with torch.no_grad():  # the last validation: one batch, the final model
        mu, logvar = model.encode(data.val_split.images[: data.batch_size])
        kl_per_dim = gaussian_kl(mu, logvar).mean(0)
    heights = torch.tensor([height for _, _, height in bars(decoded(charts[-1]))]).float()
    assert len(heights) == model.latent_dim
    # Bar d is dimension d: the heights follow the KL of each dimension in order.
    torch.testing.assert_close(
        heights / heights.max(), kl_per_dim / kl_per_dim.max(), rtol=0, atol=0.02
    )
