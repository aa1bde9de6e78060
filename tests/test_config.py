"""The config schema, checked in-process (fast): every group option composes and validates,
aliases resolve, and bad values are all reported at once with their keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.train import CONFIG_DIR
from vae.training.config import ConfigError, apply_aliases, validate_config


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    "group, option",
    [
        (p.parent.name, p.stem)
        for p in sorted(Path(CONFIG_DIR).glob("*/*.yaml"))
        if p.parent.name in ("model", "data", "trainer", "debug")
    ],
)
def test_every_group_option_composes_and_validates(group: str, option: str):
    validate_config(composed(f"{group}={option}"))


@pytest.mark.parametrize("key", ["model.latent_dim", "model.code_dim"])
def test_vqvae_code_size_can_be_set_by_either_key(key: str):
    cfg = composed("model=vqvae", f"{key}=16")
    apply_aliases(cfg)
    assert cfg.model.code_dim == 16 and cfg.model.latent_dim == 16


def test_all_invalid_values_are_reported_together():
    cfg = composed("model.latent_dim=0", "data.batch_size=0", "model.beta=-2")
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    message = str(error.value)
    for key in ("model.latent_dim=0", "data.batch_size=0", "model.beta=-2"):
        assert key in message


def test_bernoulli_on_grey_pixels_warns():
    with pytest.warns(UserWarning, match="data.binarize=dynamic"):
        validate_config(composed("data.binarize=none"))
