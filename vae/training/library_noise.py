"""Messages of the libraries underneath that a kl-vae user cannot act on, silenced once when a
console script starts (``vae-train``, ``vae-eval``).

Each filter matches one message by its logger (or warning category) and its opening words, so
every other message of those libraries still shows, and so does every message of ours.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, opening words of the message) of the log records that are dropped.
DROPPED_LOG_RECORDS = (
    # An advertisement for Lightning's cloud logger, at every Trainer start.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
)
# (category, regular expression matched against the start of the message) of the warnings that
# are ignored. Lightning's pytree helper uses torch's deprecated LeafSpec: Lightning's to change.
IGNORED_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``opening``."""

    def __init__(self, opening: str) -> None:
        super().__init__()
        self.opening = opening

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.opening)


def silence_library_noise() -> None:
    """Install the filters above (idempotent). Call at the start of a console script."""
    for name, opening in DROPPED_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.opening == opening for f in logger.filters):
            logger.addFilter(_DropMessage(opening))
    for category, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
