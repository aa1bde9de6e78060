"""model=text_vae: pads out of every term, word dropout in training only, the closed-form KL,
vae-train on a tiny corpus with its tags read back, and vae-eval's importance-sampled NLL."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.cli import QUICK, last_line, load_events, read_metrics, run_cli
from tests.test_data_text import write_corpus
from tests.test_tag_table import readme_table_tags
from vae.losses import gaussian_kl
from vae.models import TextVAE
from vae.nn.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, word_dropout
from vae.training import tags

VOCAB = ["<pad>", "<unk>", "<bos>", "<eos>", *"abcdefg"]


def sentences():
    """Three sentences of lengths 6, 4, 3 (with <bos>/<eos>), padded with 0."""
    tokens = torch.tensor([[2, 4, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0, 0], [2, 10, 3, 0, 0, 0, 0]])
    return tokens, (tokens != PAD_ID).sum(dim=1)


def test_padding_changes_no_term():
    torch.manual_seed(0)
    model = TextVAE(VOCAB, latent_dim=3, embed_dim=8, hidden_dim=16).eval()
    tokens, lengths = sentences()
    torch.manual_seed(1)
    _, ref, *_ = model.terms(tokens, lengths, step=0)
    # Other ids at the padded positions, and a longer padding: the same numbers.
    noisy = tokens.masked_fill(tokens == PAD_ID, 7)
    wider = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    for batch in (noisy, wider):
        torch.manual_seed(1)
        _, got, *_ = model.terms(batch, lengths, step=0)
        for name in ("recon", "kl", "elbo"):
            torch.testing.assert_close(got[name], ref[name], msg=name)
    torch.manual_seed(1)
    torch.testing.assert_close(model.compute_terms(wider, 0)[1]["elbo"], ref["elbo"])


def test_word_dropout_replaces_only_words_and_only_in_training():
    tokens, lengths = sentences()
    dropped = word_dropout(tokens, 1.0)
    words = tokens > EOS_ID
    assert (dropped[words] == UNK_ID).all() and (dropped[~words] == tokens[~words]).all()
    assert (word_dropout(tokens, 0.0) == tokens).all()
    half = word_dropout(tokens.repeat(200, 1), 0.5, torch.Generator().manual_seed(0))
    assert 0.45 < (half[words.repeat(200, 1)] == UNK_ID).float().mean() < 0.55
    assert (half[:, 0] == BOS_ID).all()

    torch.manual_seed(0)
    model = TextVAE(VOCAB, latent_dim=3, embed_dim=8, hidden_dim=16, word_dropout=1.0)
    z = torch.zeros(3, 3)
    model.eval()
    evaluated = model.reconstruction_nll(z, tokens, lengths)
    model.train()
    trained = model.reconstruction_nll(z, tokens, lengths)
    assert not torch.allclose(trained, evaluated)  # training sees <unk> inputs
    model.word_dropout = 0.0
    torch.testing.assert_close(model.reconstruction_nll(z, tokens, lengths), evaluated)
    with pytest.raises(ValueError, match="model.word_dropout"):
        TextVAE(VOCAB, word_dropout=1.5)


def test_the_kl_is_the_closed_form_of_torch_distributions():
    torch.manual_seed(0)
    model = TextVAE(VOCAB, latent_dim=4, embed_dim=8, hidden_dim=16).eval()
    tokens, lengths = sentences()
    mu, logvar = model.encode(tokens)
    _, terms, _, kl, _ = model.terms(tokens, lengths, step=0)
    reference = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(kl, reference)
    torch.testing.assert_close(terms["kl"], reference.sum(-1).mean())
    torch.testing.assert_close(gaussian_kl(mu, logvar), reference)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A text_vae run of 4 epochs on the tiny corpus, with test=true: (cwd, run directory)."""
    cwd = tmp_path_factory.mktemp("text_vae")
    write_corpus(cwd / "corpus")
    proc = run_cli(
        "vae-train",
        "model=text_vae",
        "data=fortunes",
        f"data.root={cwd / 'corpus'}",
        "data.min_count=1",
        "data.batch_size=8",
        "trainer.max_epochs=4",
        "model.latent_dim=4",
        "model.word_dropout=0.25",
        "model.kl_schedule=linear",
        "model.regulariser.warmup_steps=10",
        "eval.k=8",
        "test=true",
        *QUICK,
        cwd=cwd,
    )
    return cwd, cwd / last_line(proc.stdout)


def texts(events, tag):
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def test_vae_train_on_a_tiny_corpus_logs_text_vae_tags(trained_run):
    _, run_dir = trained_run
    events = load_events(run_dir)
    scalars = set(events.Tags()["scalars"])
    assert {*tags.TEXT_VAE_TRAIN_SCALARS, *tags.TEXT_VAE_VAL_SCALARS} <= scalars
    assert tags.VAL_KL_PER_DIM in events.Tags()["histograms"]
    for tag in tags.TEXT_VAE_TEXTS:
        assert len(events.Tensors(f"{tag}/text_summary")) == 4, tag
    recon = texts(events, tags.VAL_RECONSTRUCTIONS).split("\n\n")  # the first val batch's
    assert len(recon) >= 2 and all(" \n→ " in entry for entry in recon)
    assert texts(events, tags.VAL_INTERPOLATION).startswith("1. ")
    assert "7. " in texts(events, tags.VAL_INTERPOLATION)
    # The warm-up: beta rises linearly from 0 to 1 over 10 steps, then stays.
    betas = {int(e.step): e.value for e in events.Scalars(tags.TRAIN_BETA)}
    assert min(betas.values()) < 0.5 and betas[max(betas)] == pytest.approx(1.0)
    metrics = read_metrics(run_dir)
    assert metrics["val/elbo"] == pytest.approx(-(metrics["val/recon"] + metrics["val/kl"]))
    vocab_size = len(
        torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"][
            "vocabulary"
        ]
    )
    assert 1 < metrics["val/perplexity"] < vocab_size
    assert 0 <= metrics["val/active_units"] <= 4
    assert scalars - {"epoch"} | set(tags.TEXT_VAE_TEXTS) <= readme_table_tags()


def test_vae_eval_estimates_the_nll_by_importance_sampling(trained_run):
    cwd, run_dir = trained_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("vae-eval", f"ckpt_path={ckpt}", "eval.k=8", cwd=cwd)
    assert "no sample scores for text" in proc.stdout
    metrics = read_metrics(run_dir)
    for key in ("test/nll_iw", "test/elbo", "test/kl", "test/perplexity", "test/active_units"):
        assert math.isfinite(metrics[key]), key
    # IW with k = 8 is at least as tight as the ELBO, up to its Monte Carlo error.
    assert metrics["test/nll_iw"] <= -metrics["test/elbo"] + 0.5
    assert metrics["test/importance_samples"] == 8


def markov_corpus(num_sentences=64, num_words=5):
    """Sentences of ``num_words`` words, each one of two successors of the previous one (log 2
    nats per word): a GRU decoder models them without z, the setting of posterior collapse."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(num_sentences):
        words = [4]
        for _ in range(num_words - 1):
            choice = int(torch.randint(0, 2, (1,), generator=g))
            words.append(4 + (2 * (words[-1] - 4) + choice) % 7)
        rows.append([BOS_ID, *words, EOS_ID])
    return torch.tensor(rows)


def train_kl_and_recon(free_bits, steps=300):
    torch.manual_seed(0)
    tokens = markov_corpus()
    model = TextVAE(VOCAB, latent_dim=4, embed_dim=16, hidden_dim=32, free_bits=free_bits)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss, _ = model.compute_terms(tokens, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        terms = model.compute_terms(tokens, steps)[1]
    return float(terms["kl"]), float(terms["recon"])


def test_posterior_collapse_and_free_bits():
    """Without annealing or word dropout the KL goes to ~0 (the decoder ignores z); with free
    bits lambda = 0.5 nats per dimension the penalty is flat below lambda * D = 2 nats, and the
    KL stays near that floor, used: the reconstruction is better than the collapsed model's."""
    collapsed_kl, collapsed_recon = train_kl_and_recon(free_bits=0.0)
    assert collapsed_kl < 0.1
    kl, recon = train_kl_and_recon(free_bits=0.5)
    assert kl > 0.9 * 0.5 * 4
    assert recon < collapsed_recon - 0.5


def test_bad_text_vae_settings_are_named_before_anything_is_built():
    from tests.test_config import composed
    from vae.training.config import ConfigError, validate_config

    cfg = composed(
        "model=text_vae", "data=fortunes", "model.word_dropout=1.5", "model.latent_dim=0"
    )
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert "model.word_dropout=1.5" in str(error.value)
    assert "model.latent_dim=0" in str(error.value)
    validate_config(composed("model=text_vae", "data=fortunes", "model.word_dropout=1.0"))
