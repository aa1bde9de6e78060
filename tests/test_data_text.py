"""data=fortunes: reading, offensive sections, split, length cap, vocabulary, batches."""

import logging
import struct
from pathlib import Path

import pytest
import torch

from vae.data import DatasetNotFoundError, FortunesDataModule, Vocabulary
from vae.data.fortunes import (
    BOS_ID,
    EOS_ID,
    FORTUNES_DIR,
    PAD_ID,
    UNK_ID,
    fortune_files,
    pad_batch,
    read_fortune_texts,
    tokenize,
)

WORDS = "the cat sat on a mat and the dog ran to the park while it rained".split()


def write_corpus(root, num_texts=60, long_every=10):
    """A tiny fortune folder: ``num_texts`` texts, every ``long_every``-th one 80 words long;
    plus offensive files that must be left out."""
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(num_texts):
        size = 80 if i % long_every == 0 else 3 + i % 7
        texts.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(size)) + f" {i}.")
    (root / "tiny").write_text("\n%\n".join(texts) + "\n%\n")
    (root / "tiny.dat").write_bytes(struct.pack(">6I", 2, num_texts, 0, 0, 0, 0))
    (root / "off").mkdir(exist_ok=True)
    (root / "off" / "rude").write_text("offensivetoken one\n%\noffensivetoken two\n")
    (root / "rude-o").write_text("offensivetoken three\n")
    (root / "rotated").write_text("bssrafvirgbxra\n%\n")
    (root / "rotated.dat").write_bytes(struct.pack(">6I", 2, 1, 0, 0, 0x4, 0))
    return texts


def test_offensive_sections_and_separators_are_handled(tmp_path):
    texts = write_corpus(tmp_path)
    read = read_fortune_texts(tmp_path)
    assert read == [t.strip() for t in texts]
    assert not any("offensive" in t or "bssra" in t for t in read)


def test_split_is_seeded_and_long_texts_are_dropped_and_counted(tmp_path, caplog):
    write_corpus(tmp_path)
    with caplog.at_level(logging.INFO, logger="vae.data.fortunes"):
        dm = FortunesDataModule(
            root=str(tmp_path), max_tokens=64, min_count=1, val_fraction=0.2, test_fraction=0.2
        )
        dm.setup()
    # 60 texts, 6 of them 80 words + "n ." long: 12 held out each side before the cap.
    assert sum(dm.dropped.values()) == 6
    assert sum(len(s) for s in dm.splits.values()) == 54
    assert "dropped" in caplog.text and "data.max_tokens=64" in caplog.text
    again = FortunesDataModule(root=str(tmp_path), min_count=1, val_fraction=0.2, test_fraction=0.2)
    again.setup()
    assert again.splits == dm.splits
    other = FortunesDataModule(
        root=str(tmp_path), min_count=1, val_fraction=0.2, test_fraction=0.2, split_seed=1
    )
    other.setup()
    assert other.splits["val"] != dm.splits["val"]
    longest = max(len(s) for split in dm.splits.values() for s in split)
    assert longest <= 64 + 2


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    write_corpus(tmp_path)
    dm = FortunesDataModule(root=str(tmp_path), min_count=1, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    vocab = dm.vocabulary
    assert vocab.tokens[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    train_words = {vocab.tokens[i] for s in dm.splits["train"] for i in s}
    assert set(vocab.tokens[4:]) <= train_words
    # The number ending each text is unique to it: held-out numbers are unknown words.
    assert all(s[-3] == UNK_ID for s in dm.splits["val"])
    assert Vocabulary.build([["b", "a", "b"], ["c"]], min_count=2).tokens[4:] == ["b"]


def test_tokenization_round_trip_and_saved_vocabulary(tmp_path):
    vocab = Vocabulary.build([tokenize("Don't panic, it's only a test.")])
    ids = vocab.encode(tokenize("Don't PANIC, it's a test."))
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert vocab.decode(ids) == ["don't", "panic", ",", "it's", "a", "test", "."]
    assert vocab.decode(vocab.encode(["zebra"])) == ["<unk>"]
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").tokens == vocab.tokens
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "<pad>"])


def test_batches_are_padded_with_zero_and_lengths_mask_them(tmp_path):
    tokens, lengths = pad_batch([[2, 5, 3], [2, 6, 7, 8, 3]])
    assert tokens.tolist() == [[2, 5, 3, 0, 0], [2, 6, 7, 8, 3]]
    assert lengths.tolist() == [3, 5]
    mask = torch.arange(tokens.shape[1]) < lengths[:, None]
    assert torch.equal(mask, tokens != PAD_ID)

    write_corpus(tmp_path)
    dm = FortunesDataModule(
        root=str(tmp_path), batch_size=8, min_count=1, val_fraction=0.2, test_fraction=0.2, seed=0
    )
    dm.setup()
    tokens, lengths = next(iter(dm.train_dataloader()))
    assert tokens.dtype == lengths.dtype == torch.int64 and tokens.shape[0] == 8
    mask = torch.arange(tokens.shape[1]) < lengths[:, None]
    assert torch.equal(mask, tokens != PAD_ID)
    assert (tokens[torch.arange(8), lengths - 1] == EOS_ID).all()


def test_missing_corpus_names_the_package(tmp_path):
    dm = FortunesDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="apt-get install fortunes.*data.root"):
        dm.setup()


def test_a_binary_file_is_named(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(DatasetNotFoundError, match="binary is not UTF-8"):
        FortunesDataModule(root=str(tmp_path)).setup()


def test_a_cap_that_empties_a_split_names_the_key(tmp_path):
    write_corpus(tmp_path)
    with pytest.raises(ValueError, match="data.max_tokens=2 leaves the train split"):
        FortunesDataModule(root=str(tmp_path), max_tokens=2).setup()


@pytest.mark.skipif(
    not Path(FORTUNES_DIR).is_dir(),
    reason="the Debian package fortunes is not installed (.ci/run installs it)",
)
def test_the_real_corpus_is_read_without_offensive_files():
    files = fortune_files(FORTUNES_DIR)
    assert files and not any("off" in p.parts or p.name.endswith("-o") for p in files)
    assert len(read_fortune_texts(FORTUNES_DIR)) > 10_000
