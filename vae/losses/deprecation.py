"""Old spellings of :mod:`vae.losses` arguments: kept with a warning, or refused, never guessed.

When the conventions of :mod:`vae.losses` (its package docstring) changed an argument, a call
in the old spelling either keeps its old meaning, with a ``DeprecationWarning`` that names the
new spelling, or fails with a ``TypeError`` that names it. It is never silently read in a new
way:

* a renamed keyword is accepted under its old name (``gaussian_nll(log_sigma=...)``);
* an argument that became keyword-only without changing meaning is accepted by position
  (``laplace_nll(loc, target, log_scale)``);
* a position whose meaning changed is refused (``KLDivergence()(a, b)``, whose order was
  (target, predicted); ``gaussian_nll(mean, target, s)``, whose s was log sigma): the new
  argument is keyword-only, so no call can mean one thing before and another after.

The accepted old spellings are removed in version 0.3.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["old_spellings"]

# Frames inside these directories are skipped, so that the warning points at the caller's line
# (an nn.Module's forward is reached through torch's __call__ machinery).
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.nn.modules.module.__file__)) + os.sep,
)


def _warn(message: str) -> None:
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def old_spellings(
    write: str,
    *,
    renamed: dict[str, str | tuple[str, Callable[[Any], Any]]] | None = None,
    positional: tuple[str, ...] = (),
    refuse_positional: str = "",
) -> Callable[[Callable], Callable]:
    """Decorator: accept, or refuse with a clear message, a function's old argument spellings.

    Args:
        write: the current spelling, quoted in every warning and error.
        renamed: ``{old keyword: new keyword}`` or ``{old keyword: (new keyword, convert)}``:
            the old keyword is passed on as ``new=convert(value)``, with a warning.
        positional: in order, the arguments that became keyword-only keeping their meaning:
            accepted by position, with a warning.
        refuse_positional: why a positional call would be a guess; if given, arguments past
            the positional ones raise a TypeError saying so (``positional`` must be empty).

    The current spelling costs one length test and one set test per call.
    """
    renamed = {
        old: new if isinstance(new, tuple) else (new, lambda value: value)
        for old, new in (renamed or {}).items()
    }

    def decorate(function: Callable) -> Callable:
        parameters = inspect.signature(function).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        num_positional = sum(p.kind in kinds for p in parameters)
        owner = function.__qualname__.split(".")[0]

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            extra = args[num_positional:]
            if not extra and renamed.keys().isdisjoint(kwargs):
                return function(*args, **kwargs)  # the current spelling
            if extra and refuse_positional:
                raise TypeError(f"{owner}: {refuse_positional}; write {write}")
            if len(extra) > len(positional):
                return function(*args, **kwargs)  # Python's own TypeError
            used = []
            if extra:
                names = positional[: len(extra)]
                used.append(f"passing {', '.join(repr(name) for name in names)} by position")
                for name, value in zip(names, extra, strict=True):
                    if name in kwargs:
                        raise TypeError(f"{owner}: got multiple values for argument '{name}'")
                    kwargs[name] = value
                args = args[:num_positional]
            for old, (new, convert) in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{owner}: got both '{old}' (deprecated) and '{new}'; pass only {new}"
                        )
                    kwargs[new] = convert(kwargs.pop(old))
                    used.append(f"argument '{old}'")
            _warn(f"{owner}: {' and '.join(used)} is deprecated (removed in 0.3); write {write}")
            return function(*args, **kwargs)

        return wrapper

    return decorate
