"""``data=fortunes``: the short texts of the Debian package ``fortunes``, as word-id sequences.

The package holds about 14,700 texts in ``%``-separated files under ``/usr/share/games/fortunes``
(``apt-get install fortunes``). Offensive sections are left out: the ``off/`` folder (package
``fortunes-off``), files named ``*-o`` (the BSD convention) and files whose ``.dat`` index says
they are ROT13-encoded (how the offensive files are stored).

Pipeline, each step a plain function the tests call directly:

1. ``read_fortune_texts(root)``: every text, in sorted file order, whitespace-trimmed;
2. a seeded train / val / test split (``split_seed``, ``vae.data.splits.split_indices``);
3. ``tokenize``: lower-case words and single punctuation marks; texts with more than
   ``max_tokens`` words are dropped from each split (the count is logged);
4. ``Vocabulary.build`` from the **training split only**: ``<pad>`` = 0, ``<unk>``, ``<bos>``,
   ``<eos>``, then the words seen at least ``min_count`` times, most frequent first.

Batches are ``(tokens, lengths)``: ``tokens`` int64 (B, T) = ``<bos> w_1 .. w_n <eos>`` padded
with 0 (``<pad>``) to the longest in the batch, ``lengths`` int64 (B,) = n + 2 (the unpadded
length, ``<bos>`` and ``<eos>`` included).

The vocabulary travels with the model (its hyper-parameters, so the checkpoint), and the
model writes it as ``<run>/vocab.json``; ``vae-eval`` gives the checkpoint's vocabulary back to
this DataModule (``vocabulary=``), so the test ids are those the model was trained on.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, SequentialSampler

from vae.data.batching import EpochShuffleSampler, ResumableDataLoader
from vae.data.errors import DatasetNotFoundError
from vae.data.seeds import WORKER_STREAM, seeded_generator
from vae.data.splits import split_indices
from vae.data.tensor_datamodule import check_integer_setting

log = logging.getLogger(__name__)

FORTUNES_DIR = "/usr/share/games/fortunes"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
_STR_ROTATED = 0x4  # strfile(8) flag in a .dat header: the texts are ROT13 (offensive)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case words (``don't`` stays one) and single punctuation marks, in order."""
    return _WORD.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Tokens joined by spaces (the tokenization keeps no spacing)."""
    return " ".join(tokens)


class Vocabulary:
    """Word <-> id, with ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIALS or len(set(tokens)) != len(tokens):
            raise ValueError(
                f"a vocabulary must start with {list(SPECIALS)} and hold each token once, "
                f"got {tokens[:6]}..."
            )
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def build(cls, texts: Sequence[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """From tokenized texts: the words seen ``min_count`` times or more, most frequent
        first (ties alphabetical, so the vocabulary does not depend on the text order)."""
        counts = Counter(token for text in texts for token in text)
        words = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
            key=lambda w: (-counts[w], w),
        )
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """``<bos>`` + the words' ids (``<unk>`` for unknown words) + ``<eos>``."""
        return [BOS_ID, *(self.index.get(t, UNK_ID) for t in tokens), EOS_ID]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """The words of ``ids``, stopping at the first ``<eos>`` or ``<pad>``; ``<bos>`` skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i in (EOS_ID, PAD_ID):
                break
            if i != BOS_ID:
                words.append(self.tokens[i])
        return words

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.tokens, ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls(json.loads(Path(path).read_text()))


def _is_offensive(path: Path, root: Path) -> bool:
    if "off" in path.relative_to(root).parts[:-1] or path.name.endswith("-o"):
        return True
    dat = path.with_name(path.name + ".dat")
    if dat.is_file():
        header = dat.read_bytes()[:24]  # version, count, longest, shortest, flags: big-endian
        if len(header) == 24 and struct.unpack(">6I", header)[4] & _STR_ROTATED:
            return True
    return False


def fortune_files(root: str | Path) -> list[Path]:
    """The inoffensive fortune files under ``root``, sorted: not ``.dat``/``.u8`` indexes or
    links, not the ``off/`` folder, ``*-o`` files or ROT13-encoded files."""
    root = Path(root)
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and not path.is_symlink()
        and path.suffix not in (".dat", ".u8")
        and not _is_offensive(path, root)
    )


def _missing(root: Path, why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"data=fortunes: {why} (data.root={root}). Install the Debian package with "
        "`apt-get install fortunes` (it puts the texts in /usr/share/games/fortunes), or point "
        "data.root to a folder of %-separated text files."
    )


def read_fortune_texts(root: str | Path) -> list[str]:
    """Every text of the fortune files under ``root``, trimmed, empty ones left out."""
    root = Path(root)
    files = fortune_files(root) if root.is_dir() else []
    if not files:
        raise _missing(root, "no fortune files found")
    texts = []
    for path in files:
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DatasetNotFoundError(
                f"data=fortunes: {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                f"remove it from data.root={root}."
            ) from None
        texts.extend(t.strip() for t in re.split(r"^%\s*$", content, flags=re.MULTILINE))
    return [t for t in texts if t]


class FortunesDataModule(L.LightningDataModule):
    """The fortunes as ``(tokens, lengths)`` batches; see the module docstring.

    Args:
        root: the folder of fortune files (``data.root``), default the Debian location.
        batch_size, num_workers: as for the image DataModules.
        max_tokens: texts with more words than this are dropped (``<bos>``/``<eos>`` excluded).
        min_count: words seen fewer times than this in the training split become ``<unk>``.
        val_fraction, test_fraction: shares of the texts held out, before the length cap.
        split_seed: seed of the split (independent of the training seed).
        seed: seed of the shuffle order; None: ``torch.initial_seed()``.
        vocabulary: a saved vocabulary (list of tokens) to use instead of building one, e.g.
            the one in a checkpoint (``vae-eval``).
    """

    name = "fortunes"
    modality = "text"

    def __init__(
        self,
        root: str = FORTUNES_DIR,
        batch_size: int = 64,
        num_workers: int = 0,
        max_tokens: int = 64,
        min_count: int = 2,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        seed: int | None = None,
        vocabulary: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.root = str(root)
        self.batch_size = check_integer_setting(batch_size, "data.batch_size", 1, "")
        self.num_workers = check_integer_setting(num_workers, "data.num_workers", 0, "")
        self.max_tokens = check_integer_setting(max_tokens, "data.max_tokens", 1, "")
        self.min_count = check_integer_setting(min_count, "data.min_count", 1, "")
        self.split_seed = check_integer_setting(split_seed, "data.split_seed", 0, "")
        for key, value in (
            ("data.val_fraction", val_fraction),
            ("data.test_fraction", test_fraction),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{key} must be a number in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} "
                "leaves no training texts; use e.g. 0.05 each."
            )
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.seed = seed
        self.vocabulary = None if vocabulary is None else Vocabulary(vocabulary)
        self.splits: dict[str, list[list[int]]] = {}
        self.dropped: dict[str, int] = {}
        self.save_hyperparameters(logger=False, ignore=["vocabulary"])
        self._resume_position: tuple[int, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read, split, cap and encode once; later calls do nothing."""
        if self.splits:
            return
        texts = read_fortune_texts(self.root)
        n = len(texts)
        sizes = [max(1, round(n * f)) for f in (self.val_fraction, self.test_fraction)]
        if sum(sizes) >= n:
            raise _missing(Path(self.root), f"only {n} texts, too few for three splits")
        parts = split_indices(n, sizes, self.split_seed)
        tokenized = {}
        for name, index in zip(("train", "val", "test"), parts, strict=True):
            kept = [tokenize(texts[i]) for i in index.tolist()]
            tokenized[name] = [t for t in kept if 0 < len(t) <= self.max_tokens]
            self.dropped[name] = len(kept) - len(tokenized[name])
            if not tokenized[name]:
                raise ValueError(
                    f"data.max_tokens={self.max_tokens} leaves the {name} split of "
                    f"{self.root} empty: every text is longer; raise data.max_tokens."
                )
        log.info(
            "fortunes: dropped %s texts longer than data.max_tokens=%d (train/val/test); kept %s",
            "/".join(str(v) for v in self.dropped.values()),
            self.max_tokens,
            "/".join(str(len(v)) for v in tokenized.values()),
        )
        if self.vocabulary is None:
            self.vocabulary = Vocabulary.build(tokenized["train"], self.min_count)
        self.splits = {
            name: [self.vocabulary.encode(t) for t in texts] for name, texts in tokenized.items()
        }

    # --- loaders ---------------------------------------------------------------------------
    def _loader(self, name: str, sampler) -> DataLoader:
        if not self.splits:
            raise RuntimeError("FortunesDataModule.setup() must run before asking for a loader")
        return ResumableDataLoader(
            self.splits[name],
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=pad_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=seeded_generator(WORKER_STREAM, self.resolved_seed()),
        )

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else torch.initial_seed()

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.splits["train"]), self.resolved_seed())
        if self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", SequentialSampler(self.splits["val"]))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", SequentialSampler(self.splits["test"]))

    def padded(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split as one ``(tokens, lengths)`` batch (for evaluation)."""
        if not self.splits:
            raise RuntimeError("FortunesDataModule.setup() must run before asking for a split")
        return pad_batch(self.splits[name])

    # Mid-epoch resume, as in vae.data.tensor_datamodule.InMemoryDataModule.
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed * self.batch_size
        return {"epoch": trainer.current_epoch, "examples_done": done}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["examples_done"]))


def pad_batch(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, lengths)``: int64 (B, T) padded with ``<pad>`` = 0, and int64 (B,)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    tokens = torch.full((len(sequences), int(lengths.max())), PAD_ID, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.int64)
    return tokens, lengths
