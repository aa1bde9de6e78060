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
# The README's commands, run as a user would, with tiny settings. They run as independent
# chains, each in a fresh folder, so that pytest-xdist spreads them over its workers (in one
# serial test they took ~5 min, the longest tail of `make test`). A command that reads what an
# earlier one wrote shares its chain, in README order: a `<run>` placeholder (the newest run of
# that name in the chain's folder), a resume, a vae-eval of a run, a vae-compare of a sweep.
# `vae-compare logs` compares the runs of its own chain: an IWAE and an FSQ VQ-VAE, two groups,
# one without val/kl (tests/test_compare.py checks mixed log folders in detail). Each vae-train
# process costs ~7 s of start-up however small its run, so a chain holds at most three.
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
# The README's shell commands (as readme_shell_commands() gives them), chain by chain; the
# longest chains first, so that xdist starts them early. test_chains_cover_the_readme checks
# that these are exactly the README's distinct commands: a command the README repeats word for
# word runs once, unless its chain repeats it (a second sweep beside the first).
README_CHAINS = {
    "fashion_nll_table_then_compare": (
        "vae-train -m experiment=fashion_nll_table",
        "vae-compare logs/fashion_nll_table --metrics test/nll_iw,test/elbo,test/kl,"
        "test/mutual_info,test/total_correlation,test/active_units",
    ),
    "beta_sweep_twice_then_compare": (
        "vae-train -m experiment=beta_sweep",
        "vae-train -m experiment=beta_sweep",
        "vae-compare logs/beta_sweep",
    ),
    "iwae_and_fsq_then_compare_all": (
        "vae-train model=iwae model.k=5 model.gradient_estimator=dreg",
        "vae-train model=vqvae model/quantizer=fsq model.quantizer.levels=[8,6,5] "
        "model.code_dim=3 model.num_codes=240",
        "vae-compare logs --metrics val/elbo,val/kl,test/nll_iw --out reports/all",
    ),
    "vqvae_then_prior_then_eval": (
        "vae-train model=vqvae",
        "vae-train model=vqvae_prior model.vqvae_ckpt=logs/vqvae_digits/<run>/checkpoints/last.ckpt",
        "vae-eval ckpt_path=logs/vqvae_prior_digits/<run>",
    ),
    "resume_then_eval": (
        "vae-train trainer.max_epochs=2 seed=1",
        "vae-train ckpt_path=logs/vae_digits/<run> trainer.max_epochs=4",
        "vae-eval ckpt_path=logs/vae_digits/<run>/checkpoints/last.ckpt eval.k=1000",
    ),
    "vae_fashion_8bit_then_eval": (
        "vae-train experiment=vae_fashion_8bit",
        "vae-eval ckpt_path=logs/vae_fashion_8bit/<run> eval.k=1000 eval.limit=1000 "
        "eval.sample_scores=false",
    ),
    "text_lm_then_eval": (
        "vae-train model=text_lm data=fortunes model.top_k=20",
        "vae-eval ckpt_path=logs/text_lm_fortunes/<run>",
    ),
    "beta_sweep_fashion": ("vae-train -m experiment=beta_sweep_fashion",),
    "kl_schedules": ("vae-train -m experiment=kl_schedules",),  # the README has it twice
    "four_models_sweep": ("vae-train -m model=iwae,beta_tcvae,vampprior,ladder_vae",),
    "beta_sweep_by_hand": ("vae-train -m model.beta=0.5,1,4",),
    "defaults": ("vae-train",),  # the install check and section 1: the same command
    "beta_and_latent_dim": ("vae-train model.beta=4 model.latent_dim=16",),
    "warm_up_and_free_bits": (
        "vae-train model.kl_schedule=linear model.regulariser.warmup_steps=500 "
        "model.free_bits=0.25",
    ),
    "vae_fashion": ("vae-train experiment=vae_fashion",),
    "debug_fdr": ("vae-train debug=fdr",),
}


def readme_shell_commands() -> list[str]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            if command and not command.startswith(("make ", "python3.11", "pip ", "pytest")):
                commands.append(command)
    return commands


def _runnable(command: str) -> bool:
    """False for the NOT_RUN tools and for lines whose data set is not installed."""
    if shlex.split(command)[0] in NOT_RUN:
        return False
    if "fashion" in command and not FASHION_INSTALLED:
        return False  # CI installs dataset-fashion-mnist; without it these lines cannot run
    if "fortunes" in command and not FORTUNES_INSTALLED:
        return False  # CI installs fortunes (data=fortunes); without it these lines cannot run
    return True


def _is_subsequence(chain: tuple[str, ...], commands: list[str]) -> bool:
    remaining = iter(commands)
    return all(command in remaining for command in chain)


def test_chains_cover_the_readme():
    """Every distinct README shell command but the NOT_RUN tools is in exactly one chain, and
    each chain keeps README order; so no command is skipped, and none is run twice for nothing."""
    commands = readme_shell_commands()
    in_readme = {c for c in commands if shlex.split(c)[0] not in NOT_RUN}
    owners = {c: [n for n, chain in README_CHAINS.items() if c in chain] for c in in_readme}
    chained = {command for chain in README_CHAINS.values() for command in chain}
    assert chained == in_readme, (
        f"README commands in no chain: {sorted(in_readme - chained)}; "
        f"chain commands not in the README: {sorted(chained - in_readme)}; "
        "add each new README command to README_CHAINS (with the commands it reads from)"
    )
    assert all(len(names) == 1 for names in owners.values()), {
        c: names for c, names in owners.items() if len(names) > 1
    }
    for name, chain in README_CHAINS.items():
        assert _is_subsequence(chain, commands), f"chain {name} is not in README order"
    tools = [shlex.split(c)[0] for c in sorted(in_readme)]
    assert set(tools) == {"vae-train", "vae-eval", "vae-compare"}, tools
    assert tools.count("vae-train") >= 10 and "vae-eval" in tools and "vae-compare" in tools


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
@pytest.mark.parametrize("chain", README_CHAINS)
def test_readme_commands_run_in_order(chain: str, tmp_path: Path):
    for command in filter(_runnable, README_CHAINS[chain]):
        words = shlex.split(command)
        tool, args = words[0], words[1:]
        args = _tiny(tool, [_fill_placeholder(a, tmp_path) for a in args])
        run_cli(tool, *args, cwd=tmp_path, timeout=600)
        if "--out" in args:
            out = tmp_path / args[args.index("--out") + 1]
            assert (out / "rate_distortion.png").is_file(), sorted(out.iterdir())
