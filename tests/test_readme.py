"""The README's code works: its Python snippets run, and every `vae-train` command in it
composes to a valid config (the same commands run for real in the end-to-end tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.train import CONFIG_DIR
from vae.config import validate_config

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TEXT, flags=re.DOTALL)


PYTHON_BLOCKS = code_blocks("python")
TRAIN_COMMANDS = [
    line.split("#")[0].strip()
    for block in code_blocks("bash")
    for line in block.splitlines()
    if line.strip().startswith("vae-train")
]


def test_readme_has_snippets_and_commands():
    assert PYTHON_BLOCKS and len(TRAIN_COMMANDS) >= 8


@pytest.mark.parametrize("snippet", PYTHON_BLOCKS, ids=lambda s: s.splitlines()[0][:40])
def test_python_snippet_runs(snippet: str):
    exec(compile(snippet, str(README), "exec"), {"__name__": "readme"})


def _overrides(command: str) -> list[str]:
    """The command's overrides, with a sweep reduced to its first value and the README's
    placeholders (<run>) replaced by a path that does not resolve to a run."""
    overrides = []
    for arg in shlex.split(command)[1:]:
        if arg == "-m":
            continue
        key, _, value = arg.partition("=")
        if "<" in value:
            continue  # ckpt_path=logs/.../<run>/...: exercised by tests/test_reliability.py
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    return overrides


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_train_command_composes_to_a_valid_config(command: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=_overrides(command))
    validate_config(cfg)
