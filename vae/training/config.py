"""The config schema, checked in one place before anything is built or trained.

Hydra already rejects unknown groups (``model=foo``) and unknown keys (``model.foo=1``). This
module checks the *values*: each rule names the key, says what is allowed and what was given.
Rules apply only to keys that exist in the composed config, so one table serves every model.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is invalid. The message names the key and the allowed values."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: the model's parameters and losses are float32 tensors, so a setting
beyond it (``model.lr=1e39``) would overflow when it first meets a tensor, mid-run."""


def positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def non_negative_number(value: Any) -> bool:
    return _is_number(value) and value >= 0


def fraction(value: Any) -> bool:
    return _is_number(value) and 0 < value <= 1


def positive_int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(map(positive_int, value))


def one_of(*allowed: Any) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return value in allowed

    check.allowed = allowed  # type: ignore[attr-defined]
    return check


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def maybe(value: Any) -> bool:
        return value is None or check(value)

    maybe.allowed = getattr(check, "allowed", None)  # type: ignore[attr-defined]
    return maybe


def clamp_range(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(map(_is_number, value))
        and value[0] < value[1]
    )


@dataclass(frozen=True)
class Rule:
    key: str
    check: Callable[[Any], bool]
    expected: str


ARCHS = ("mlp", "conv")
# The keys of vae.losses.LIKELIHOODS, spelled out so that config errors answer without torch
# (tests/test_config.py checks that the two agree).
LIKELIHOODS = (
    "bernoulli",
    "gaussian",
    "laplace",
    "discretized_logistic",
    "discretized_gaussian",
    "discretized_logistic_mixture",
)
LR_SCHEDULES = ("constant", "cosine")
KL_SCHEDULES = ("constant", "linear", "cyclical", "capacity")
BINARIZE = ("none", "static", "dynamic")

RULES: tuple[Rule, ...] = (
    Rule("model.arch", one_of(*ARCHS), f"one of {', '.join(ARCHS)}"),
    Rule(
        "model.hidden_dims",
        positive_int_list,
        "a non-empty list of positive integers, e.g. [512,256]",
    ),
    Rule("model.latent_dim", positive_int, "a positive integer"),
    Rule("model.likelihood", one_of(*LIKELIHOODS), f"one of {', '.join(LIKELIHOODS)}"),
    Rule("model.sigma", positive_number, "a positive number (the fixed likelihood scale)"),
    Rule("model.num_mixtures", positive_int, "a positive integer (logistic mixture components)"),
    Rule("model.logvar_clamp", optional(clamp_range), "null or [low, high] with low < high"),
    Rule("model.lr", positive_number, "a positive number"),
    Rule("model.lr_schedule", one_of(*LR_SCHEDULES), f"one of {', '.join(LR_SCHEDULES)}"),
    Rule("model.beta", non_negative_number, "a number >= 0"),
    Rule("model.kl_schedule", one_of(*KL_SCHEDULES), f"one of {', '.join(KL_SCHEDULES)}"),
    Rule("model.regulariser.warmup_steps", positive_int, "a positive integer"),
    Rule("model.regulariser.cycle_steps", positive_int, "a positive integer"),
    Rule("model.regulariser.cycle_ratio", fraction, "a number in (0, 1]"),
    Rule("model.regulariser.capacity_max", non_negative_number, "a number >= 0 (nats)"),
    Rule("model.regulariser.capacity_steps", positive_int, "a positive integer"),
    Rule("model.regulariser.capacity_gamma", non_negative_number, "a number >= 0"),
    Rule("model.free_bits", non_negative_number, "a number >= 0 (nats per latent dimension)"),
    Rule("model.num_images", positive_int, "a positive integer"),
    Rule("model.compile", boolean, "true or false"),
    Rule("model.channels_last", boolean, "true or false"),
    Rule("data.batch_size", positive_int, "a positive integer"),
    Rule("data.num_workers", non_negative_int, "an integer >= 0"),
    Rule(
        "data.on_device",
        optional(boolean),
        "true, false or null (null: on the GPU when training there)",
    ),
    Rule("data.binarize", one_of(*BINARIZE), f"one of {', '.join(BINARIZE)}"),
    Rule("data.val_size", positive_int, "a positive integer"),
    Rule("trainer.max_epochs", lambda v: v is None or (_is_int(v) and v >= -1), "an integer >= -1"),
    Rule("trainer.log_every_n_steps", positive_int, "a positive integer"),
    Rule(
        "trainer.accelerator",
        lambda v: v not in ("gpu", "cuda") or _cuda_available(),
        "cpu or auto: this machine has no CUDA GPU (torch.cuda.is_available() is False)",
    ),
    Rule("seed", lambda v: v is None or _is_int(v), "an integer or null"),
    Rule(
        "threads",
        lambda v: v == "auto" or positive_int(v),
        "auto or a positive integer (torch's intra-op threads)",
    ),
    Rule("callbacks.nonfinite_guard.skip_nonfinite", boolean, "true or false"),
    Rule("test", boolean, "true or false"),
    Rule("eval.k", positive_int, "a positive integer, e.g. eval.k=5000"),
    Rule("eval.limit", optional(positive_int), "null or a positive integer"),
    Rule("eval.batch_size", positive_int, "a positive integer"),
    Rule("eval.chunk_size", optional(positive_int), "null or a positive integer"),
    Rule("eval.seed", non_negative_int, "an integer >= 0"),
)


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every invalid value in ``cfg``; warn on dubious combinations."""
    problems = []
    for rule in RULES:
        value = OmegaConf.select(cfg, rule.key, default="__missing__")
        if isinstance(value, str) and value == "__missing__":
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            problems.append(
                f"{rule.key}={value!r} is invalid: beyond float32's range (|x| <= 3.4e38), "
                f"which the model's tensors use; expected {rule.expected}."
            )
        elif not rule.check(value):
            problems.append(f"{rule.key}={value!r} is invalid: expected {rule.expected}.")
    schedule = OmegaConf.select(cfg, "model.kl_schedule")
    free_bits = OmegaConf.select(cfg, "model.free_bits")
    if schedule == "capacity" and _is_number(free_bits) and free_bits > 0:
        problems.append(
            f"model.free_bits={free_bits!r} cannot be combined with model.kl_schedule=capacity: "
            "set model.free_bits=0 or another schedule."
        )
    if len(problems) == 1:
        raise ConfigError(f"Invalid config: {problems[0]}")
    if problems:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
    likelihood = OmegaConf.select(cfg, "model.likelihood")
    binarize = OmegaConf.select(cfg, "data.binarize")
    if likelihood == "bernoulli" and binarize == "none":
        warnings.warn(
            "model.likelihood=bernoulli with data.binarize=none: the Bernoulli NLL is not a "
            "likelihood of grey-level pixels, so val/elbo is not comparable with the literature "
            "and no bits/dim is logged. Use data.binarize=dynamic for likelihood numbers.",
            stacklevel=2,
        )


# --- VQ-VAE (model=vqvae) and its prior (model=vqvae_prior) ------------------------------------


def decay_fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def existing_file(value: Any) -> bool:
    return isinstance(value, str) and Path(value).expanduser().is_file()


VQ_RULES: tuple[Rule, ...] = (
    Rule("model.num_codes", positive_int, "a positive integer (codebook size K), e.g. 512"),
    Rule("model.code_dim", positive_int, "a positive integer (size of each code), e.g. 64"),
    Rule("model.commitment", non_negative_number, "a number >= 0 (beta on the commitment term)"),
    Rule("model.ema", boolean, "true or false"),
    Rule("model.decay", decay_fraction, "a number in [0, 1) (EMA decay)"),
    Rule("model.eps", positive_number, "a positive number (Laplace smoothing of EMA counts)"),
    Rule(
        "model.dead_code_threshold",
        optional(positive_int),
        "a positive integer (training steps unused before a code is dead) or null (off)",
    ),
    Rule("model.restart_dead_codes", boolean, "true or false"),
    Rule("model.kmeans_init", boolean, "true or false"),
    Rule("model.kmeans_iters", positive_int, "a positive integer"),
    Rule("model.num_res_blocks", non_negative_int, "an integer >= 0"),
    Rule("model.res_hidden", positive_int, "a positive integer"),
    Rule(
        "model.vqvae_ckpt",
        optional(existing_file),
        "the path of an existing VQ-VAE checkpoint (<vqvae run>/checkpoints/last.ckpt), or "
        "null for a random VQ-VAE (smoke tests only)",
    ),
    Rule("model.dim", positive_int, "a positive integer (width of the prior)"),
    Rule("model.depth", positive_int, "a positive integer (layers of the prior)"),
    Rule("model.heads", positive_int, "a positive integer that divides model.dim"),
    Rule("model.dropout", decay_fraction, "a number in [0, 1)"),
    Rule("model.temperature", positive_number, "a positive number (sampling temperature)"),
)
RULES = RULES + VQ_RULES

# --- text (data=fortunes, model=text_lm or text_vae) -------------------------------------------
TEXT_RULES: tuple[Rule, ...] = (
    Rule("data.max_tokens", positive_int, "a positive integer (words per text, longer dropped)"),
    Rule("data.min_count", positive_int, "a positive integer (rarer words become <unk>)"),
    Rule("data.val_fraction", lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    Rule("data.test_fraction", lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    Rule("model.embed_dim", positive_int, "a positive integer"),
    Rule("model.hidden_dim", positive_int, "a positive integer"),
    Rule("model.num_layers", positive_int, "a positive integer"),
    Rule("model.label_smoothing", decay_fraction, "a number in [0, 1) (0: one-hot targets)"),
    Rule("model.top_k", optional(positive_int), "null (all tokens) or a positive integer"),
    Rule("model.num_samples", positive_int, "a positive integer"),
    Rule("model.max_sample_tokens", positive_int, "a positive integer"),
    Rule(
        "model.word_dropout",
        lambda v: _is_number(v) and 0 <= v <= 1,
        "a number in [0, 1] (probability that a decoder input word becomes <unk>)",
    ),
)
RULES = RULES + TEXT_RULES


def apply_aliases(cfg: DictConfig) -> None:
    """Resolve ``model.latent_dim`` as an alias of ``model.code_dim`` (VQ-VAE configs).

    The VQ-VAE config sets ``latent_dim: ${model.code_dim}``, so ``model.code_dim=N`` moves
    both. A user who writes ``model.latent_dim=N`` instead replaced that interpolation: then
    ``code_dim`` follows it. Either key alone therefore works, as the contract promises.
    """
    model = cfg.get("model")
    if model is None or "code_dim" not in model or "latent_dim" not in model:
        return
    if not OmegaConf.is_interpolation(model, "latent_dim") and model.latent_dim is not None:
        model.code_dim = model.latent_dim


# --- keys that moved or went away --------------------------------------------------------------
MOVED_KEYS = {
    **{
        f"model.{key}": f"model.regulariser.{key}"
        for key in (
            "warmup_steps",
            "cycle_steps",
            "cycle_ratio",
            "capacity_max",
            "capacity_steps",
            "capacity_gamma",
        )
    },
    "trainer_guard.skip_nonfinite": "callbacks.nonfinite_guard.skip_nonfinite",
    "trainer_guard.check_gradients": "callbacks.nonfinite_guard.check_gradients",
}
"""Old spelling -> new key; the old one keeps working on the command line (an alias)."""

REMOVED_KEYS = {
    "train_loop.steps_per_call": "Lightning now takes one optimizer step per batch; drop it.",
    "trainer_guard.inject_nan_term": "fault injection is done by the tests themselves; drop it.",
    "trainer_guard.inject_nan_step": "fault injection is done by the tests themselves; drop it.",
}


def split_override(override: str) -> tuple[str, str, str]:
    """A Hydra command-line override as (prefix, key, value): ``+model.x=1`` ->
    ``("+", "model.x", "1")``; prefixes are ``+``, ``++`` and ``~``."""
    prefix = override[: len(override) - len(override.lstrip("+~"))]
    key, _, value = override[len(prefix) :].partition("=")
    return prefix, key, value


def rewrite_moved_keys(overrides: list[str]) -> list[str]:
    """Command-line overrides with each moved key spelled the new way (``model.warmup_steps=500``
    -> ``model.regulariser.warmup_steps=500``), also in sweeps (``-m``) and with ``+``/``~``
    prefixes. A removed key raises ``ConfigError`` saying what to do instead."""
    rewritten = []
    for override in overrides:
        prefix, key, value = split_override(override)
        if key in REMOVED_KEYS:
            raise ConfigError(f"{key} no longer exists: {REMOVED_KEYS[key]}")
        sep = "=" if "=" in override else ""
        rewritten.append(f"{prefix}{MOVED_KEYS.get(key, key)}{sep}{value}")
    return rewritten


@contextlib.contextmanager
def config_errors(cfg: DictConfig):
    """A bad setting found while building objects from ``cfg`` becomes a one-line
    ``ConfigError`` naming its Hydra key, instead of a traceback.

    It catches what the builders raise for a bad value: a ``ValueError`` (our networks and
    DataModules name their arguments, e.g. ``data.val_size`` larger than the data), Lightning's
    ``MisconfigurationException`` (``trainer.precision=99``), and the ``TypeError`` of a key the
    class does not take (``+model.betaa=4``). Hydra wraps errors raised while instantiating;
    the original cause is reported.
    """
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (InstantiationException, ValueError, MisconfigurationException) as err:
        cause: BaseException = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if isinstance(cause, TypeError) and unknown:
            keys = _config_keys(cfg, [unknown.group(1)])
            where = keys[0] if keys else unknown.group(1)
            raise ConfigError(
                f"{where} is not a setting of {_class_name(cause)}: "
                "check its spelling, or remove it."
            ) from None
        if isinstance(cause, ConfigError) or not isinstance(
            cause, (ValueError, MisconfigurationException)
        ):
            raise
        keys = _config_keys(cfg, re.findall(r"\w+", str(cause).lower()))
        hint = f" (config key {', '.join(keys)})" if keys else ""
        raise ConfigError(f"{cause}{hint}") from None


def _class_name(error: BaseException) -> str:
    """``GaussianVAE`` from "GaussianVAE.__init__() got an unexpected keyword argument ..."."""
    match = re.match(r"(\w+)\.__init__\(\)", str(error))
    return match.group(1) if match else "the configured class"


def _config_keys(cfg: DictConfig, names: list[str]) -> list[str]:
    """The ``model.*``, ``data.*`` and ``trainer.*`` keys among ``names``, in order, once each."""
    return [
        f"{section}.{name}"
        for name in dict.fromkeys(names)
        for section in ("model", "data", "trainer")
        if name in (cfg.get(section) or {})
    ]
