"""``vae-train`` with a NaN injected into one loss term at one training step.

Fault injection for the reliability tests, done by the tests (a monkeypatch of every model's
``compute_terms``) rather than by a user-facing config key::

    python tests/inject_nan.py TERM STEP [vae-train overrides...]

At optimizer step STEP, the first training batch's term TERM (and so the loss) becomes NaN.
A TERM that is a ``test/*`` tag (STEP is then ignored) makes that number of
``vae.eval.suite.evaluate_split`` NaN instead, as ``vae-train test=true`` computes it.
"""

from __future__ import annotations

import sys

from experiments import train
from vae.models import LatentVariableModule


def poison(term: str, bad_step: int) -> None:
    """Make ``term`` NaN once, at training step ``bad_step``, in every model class."""
    state = {"done": False}

    def wrap(compute_terms):
        def poisoned(self, x, step):
            loss, terms = compute_terms(self, x, step)
            if self.training and step == bad_step and not state["done"]:
                state["done"] = True
                nan = terms[term] * float("nan")
                loss, terms = loss + nan, {**terms, term: nan}
            return loss, terms

        return poisoned

    for model_class in LatentVariableModule.__subclasses__():
        model_class.compute_terms = wrap(model_class.compute_terms)


def poison_test_number(tag: str) -> None:
    """Make the ``tag`` entry of every ``evaluate_split`` result NaN."""
    from vae.eval import suite

    evaluate_split = suite.evaluate_split

    def poisoned(*args, **kwargs):
        return {**evaluate_split(*args, **kwargs), tag: float("nan")}

    suite.evaluate_split = poisoned


if __name__ == "__main__":
    if sys.argv[1].startswith("test/"):
        poison_test_number(sys.argv[1])
    else:
        poison(sys.argv[1], int(sys.argv[2]))
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    train.main()
