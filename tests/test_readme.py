"""The README's code works: its Python snippets run, and every `vae-train` command in it
composes to a valid config (the same commands run for real in the end-to-end tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.train import CONFIG_DIR
from tests.cli import QUICK, run_cli
from vae.training.config import rewrite_moved_keys, validate_config

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
    return rewrite_moved_keys(overrides)  # as vae-train does: old spellings are aliases


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_train_command_composes_to_a_valid_config(command: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=_overrides(command))
    validate_config(cfg)


# ---------------------------------------------------------------------------------------------
# The README's commands, run in order in a fresh folder as a user would, with tiny settings.
# ---------------------------------------------------------------------------------------------
FASHION_INSTALLED = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
FORTUNES_INSTALLED = Path("/usr/share/games/fortunes/fortunes").exists()
NOT_RUN = {
    "tensorboard": "a server; its log folder is what the other commands check",
    "pip": "the install, done by make test itself",
    "python3.11": "the install, done by make test itself",
    "pytest": "this test suite",
    "torchrun": "several processes; tests/test_eval_distributed.py runs vae-eval under it",
}


def readme_shell_commands() -> list[str]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            if command and not command.startswith(("make ", "python3.11", "pip ", "pytest")):
                commands.append(command)
    return commands


def _fill_placeholder(arg: str, workdir: Path) -> str:
    """``ckpt_path=logs/vae_digits/<run>/checkpoints/last.ckpt`` -> the newest such run."""
    if "<run>" not in arg:
        return arg
    key, _, value = arg.partition("=")
    folder, _, rest = value.partition("<run>")
    candidates = sorted(
        (p for p in (workdir / folder).iterdir() if (p / rest.lstrip("/")).exists()),
        key=lambda p: p.stat().st_mtime,
    )
    assert candidates, f"no run in {folder} for {arg}"
    return f"{key}={candidates[-1] / rest.lstrip('/')}"


def _tiny(tool: str, args: list[str]) -> list[str]:
    """Shrink a README command: few batches and epochs for vae-train, few samples for vae-eval."""
    out = []
    if tool == "vae-train":
        seen_epochs = False
        for arg in args:
            key, _, value = arg.partition("=")
            if key == "trainer.max_epochs":  # keep resume examples meaningful: 2 -> 1, 4 -> 2
                arg, seen_epochs = f"{key}={max(1, int(value) // 2)}", True
            out.append(arg)
        if not seen_epochs:
            out.append("trainer.max_epochs=1")
        return out + [
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            *QUICK,
        ]
    if tool == "vae-eval":
        out = [a for a in args if not a.startswith("eval.k=")]
        return out + ["eval.k=4", "eval.limit=8", "eval.batch_size=8", "eval.sample_scores=false"]
    return args


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path: Path):
    ran = []
    for command in readme_shell_commands():
        words = shlex.split(command)
        tool, args = words[0], words[1:]
        if tool in NOT_RUN:
            continue
        if "fashion" in command and not FASHION_INSTALLED:
            continue  # CI installs dataset-fashion-mnist; without it these lines cannot run
        if "fortunes" in command and not FORTUNES_INSTALLED:
            continue  # CI installs fortunes (data=fortunes); without it these lines cannot run
        assert tool in ("vae-train", "vae-eval", "vae-compare"), (
            f"untested README command: {command}"
        )
        args = _tiny(tool, [_fill_placeholder(a, tmp_path) for a in args])
        run_cli(tool, *args, cwd=tmp_path, timeout=600)
        ran.append(tool)
    assert ran.count("vae-train") >= 10 and "vae-eval" in ran and "vae-compare" in ran
    assert (tmp_path / "reports" / "all" / "rate_distortion.png").is_file()
