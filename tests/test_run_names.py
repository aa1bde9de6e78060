"""Run directory names: recognisable, distinct, and pasteable into ``ckpt_path=``."""

from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from vae.training.runs import dir_suffix

PARSER = OverridesParser.create()


@pytest.mark.parametrize(
    "overrides",
    [
        "model.beta-4",
        "model.beta-0.5__model.latent_dim-16",
        # long enough to be cut and hashed
        "callbacks.last_checkpoint.every_n_train_steps-10__seed-11__trainer.log_every_n_steps-1"
        "__trainer.max_epochs-4__model.free_bits-0.5__model.hidden_dims-[512,256]",
    ],
)
def test_a_run_directory_pastes_unquoted_into_ckpt_path(overrides: str):
    suffix = dir_suffix(overrides)
    assert len(suffix) <= 121
    path = f"logs/vae_digits/2026-11-26_06-46-17_863bdc{suffix}/checkpoints/last.ckpt"
    (parsed,) = PARSER.parse_overrides([f"ckpt_path={path}"])
    assert parsed.value() == path


def test_cut_names_stay_distinct():
    base = "trainer.max_epochs-4__" * 8
    a, b = dir_suffix(base + "model.beta-1"), dir_suffix(base + "model.beta-2")
    assert a != b and "__sha1-" in a and len(a) == len(b) == 121
