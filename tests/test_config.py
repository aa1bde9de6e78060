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
    import torch

    cfg = composed(f"{group}={option}")
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        # a GPU preset on a machine without one is refused before anything is built
        with pytest.raises(ConfigError, match="trainer.accelerator='gpu'.*no CUDA GPU"):
            validate_config(cfg)
        return
    validate_config(cfg)


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


def test_moved_keys_keep_their_old_spelling_as_an_alias():
    from vae.training.config import rewrite_moved_keys

    assert rewrite_moved_keys(
        ["-m", "model.warmup_steps=100,200", "+trainer_guard.skip_nonfinite=true", "seed=1"]
    ) == [
        "-m",
        "model.regulariser.warmup_steps=100,200",
        "+callbacks.nonfinite_guard.skip_nonfinite=true",
        "seed=1",
    ]
    validate_config(composed(*rewrite_moved_keys(["model.cycle_steps=50"])))


def test_a_removed_key_says_what_to_do_instead():
    from vae.training.config import rewrite_moved_keys

    with pytest.raises(ConfigError, match="train_loop.steps_per_call no longer exists"):
        rewrite_moved_keys(["train_loop.steps_per_call=8"])


def test_the_config_check_knows_every_likelihood_of_the_library():
    from vae.losses import LIKELIHOODS
    from vae.training import config

    assert sorted(config.LIKELIHOODS) == sorted(LIKELIHOODS)


def test_an_unknown_lr_schedule_is_refused_before_anything_is_built():
    with pytest.raises(ConfigError, match="model.lr_schedule='step'"):
        validate_config(composed("model.lr_schedule=step"))
