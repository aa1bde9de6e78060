"""model=text_lm: the KL = CE identities, pads out of every term, sampling, and vae-train."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.cli import QUICK, last_line, load_events, read_metrics, run_cli
from tests.test_data_text import write_corpus
from tests.test_tag_table import readme_table_tags
from vae.losses import entropy
from vae.nn.text import EOS_ID, PAD_ID, GRULanguageModel, next_token_terms, smoothed_targets
from vae.training import tags

V = 11


def batch(seed=0):
    """Three sentences of lengths 5, 3, 2 (with <bos>/<eos>), padded with 0, and logits."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 2])
    tokens = torch.randint(4, V, (3, 5), generator=g)
    tokens[:, 0] = 2
    tokens[torch.arange(3), lengths - 1] = EOS_ID
    tokens[torch.arange(5) >= lengths[:, None]] = PAD_ID
    logits = torch.randn(3, 5, V, generator=g, dtype=torch.float64).float()
    return logits.requires_grad_(), tokens, lengths


def test_one_hot_kl_equals_cross_entropy_with_pads_ignored():
    logits, tokens, lengths = batch()
    terms = next_token_terms(logits, tokens, lengths, label_smoothing=0.0)
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, V),
        tokens[:, 1:].reshape(-1),
        ignore_index=PAD_ID,
        reduction="sum",
    )
    torch.testing.assert_close(terms["kl"].sum(), ce)
    torch.testing.assert_close(terms["nll"], terms["kl"])
    assert terms["tokens"].tolist() == [4, 2, 1]


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_smoothed_kl_equals_cross_entropy_minus_target_entropy(eps):
    logits, tokens, lengths = batch(1)
    terms = next_token_terms(logits, tokens, lengths, label_smoothing=eps)
    flat_targets = tokens[:, 1:].reshape(-1)
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, V),
        flat_targets,
        ignore_index=PAD_ID,
        reduction="none",
        label_smoothing=eps,
    )
    mask = flat_targets != PAD_ID
    h = entropy(smoothed_targets(flat_targets[mask], V, eps))
    torch.testing.assert_close(terms["kl"].sum(), (ce[mask] - h).sum())
    assert (terms["kl"] < terms["nll"]).all()  # smoothing removes H(target) > 0 per token


def test_padded_positions_contribute_nothing():
    logits, tokens, lengths = batch(2)
    terms = next_token_terms(logits, tokens, lengths, label_smoothing=0.1)
    (terms["kl"].sum() + terms["nll"].sum()).backward()
    # Position t predicts token t + 1: positions >= length - 1 predict nothing.
    unused = torch.arange(5) >= (lengths[:, None] - 1)
    assert (logits.grad[unused] == 0).all() and (logits.grad[~unused] != 0).any()
    changed = logits.detach().clone()
    changed[unused] = 100.0
    again = next_token_terms(changed, tokens, lengths, label_smoothing=0.1)
    torch.testing.assert_close(again["kl"], terms["kl"].detach())


def test_projecting_only_predicted_positions_gives_the_same_terms():
    torch.manual_seed(0)
    net = GRULanguageModel(V, embed_dim=8, hidden_dim=16)
    _, tokens, lengths = batch(3)
    full = next_token_terms(net(tokens)[0], tokens, lengths, 0.1)
    features = net.features(tokens)[0]
    picked = next_token_terms(features, tokens, lengths, 0.1, project=net.output)
    for name in ("kl", "nll", "tokens"):
        torch.testing.assert_close(picked[name], full[name])


def test_sampling_top_k_one_is_greedy_and_rows_stop_at_eos():
    torch.manual_seed(0)
    net = GRULanguageModel(V, embed_dim=8, hidden_dim=16)
    greedy = net.sample(4, max_tokens=6, top_k=1, generator=torch.Generator().manual_seed(1))
    other = net.sample(4, max_tokens=6, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy, other) and (greedy == greedy[0]).all()
    drawn = net.sample(64, max_tokens=6, temperature=2.0, generator=torch.Generator())
    assert drawn.shape[1] <= 7 and not (drawn == 2).any()
    for row in drawn.tolist():
        if EOS_ID in row:
            assert all(t == PAD_ID for t in row[row.index(EOS_ID) + 1 :])
    with pytest.raises(ValueError, match="temperature"):
        net.sample(1, 3, temperature=0.0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A text_lm run of 4 epochs on the tiny corpus, with test=true: (cwd, run directory)."""
    cwd = tmp_path_factory.mktemp("text_lm")
    write_corpus(cwd / "corpus")
    proc = run_cli(
        "vae-train",
        "model=text_lm",
        "data=fortunes",
        f"data.root={cwd / 'corpus'}",
        "data.min_count=1",
        "data.batch_size=8",
        "trainer.max_epochs=4",
        "model.top_k=5",
        "test=true",
        *QUICK,
        cwd=cwd,
    )
    return cwd, cwd / last_line(proc.stdout)


def test_vae_train_on_a_tiny_corpus_logs_text_lm_tags(trained_run):
    _, run_dir = trained_run
    events = load_events(run_dir)
    scalars = set(events.Tags()["scalars"])
    assert {*tags.TEXT_LM_TRAIN_SCALARS, *tags.TEXT_LM_VAL_SCALARS} <= scalars
    samples = events.Tensors(f"{tags.VAL_SAMPLES}/text_summary")
    assert len(samples) == 4 and samples[-1].tensor_proto.string_val[0].decode().startswith("1. ")
    metrics = read_metrics(run_dir)
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    # Far better than the uniform guess over the vocabulary after 4 epochs of a tiny corpus.
    assert 1 < metrics["val/perplexity"] < len(vocab) / 4
    assert metrics["val/loss"] == pytest.approx(-metrics["val/elbo"])  # one-hot: KL = NLL
    ppl = [e.value for e in events.Scalars("val/perplexity")]
    assert ppl[-1] < ppl[0]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["vocabulary"] == vocab
    assert math.isfinite(metrics["train/loss"])
    assert scalars - {"epoch"} | {"val/samples"} <= readme_table_tags()


def test_vae_eval_reloads_the_vocabulary_and_refuses_another(trained_run):
    cwd, run_dir = trained_run
    at_train = read_metrics(run_dir)  # test=true: test/* of the final model, as vae-eval's
    vocab = json.loads((run_dir / "vocab.json").read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("vae-eval", f"ckpt_path={ckpt}", cwd=cwd)
    assert "no sample scores for text" in proc.stdout
    tested = read_metrics(run_dir)
    for key in ("test/nll_iw", "test/elbo", "test/perplexity", "test/num_examples"):
        assert tested[key] == pytest.approx(at_train[key], rel=1e-6), key
    assert tested["test/nll_iw"] == pytest.approx(-tested["test/elbo"])
    assert 1 < tested["test/perplexity"] < len(vocab) / 4
    # A vocabulary file from another run is named, and nothing is written.
    (run_dir / "vocab.json").write_text(json.dumps(vocab[:4] + ["other", *vocab[4:]]))
    proc = run_cli("vae-eval", f"ckpt_path={ckpt}", cwd=cwd, check=False)
    assert proc.returncode == 2 and "vocab.json is not the vocabulary of" in last_line(proc.stderr)
    assert read_metrics(run_dir) == tested


@pytest.mark.parametrize(
    "args",
    [["model=text_lm"], ["model=vae", "data=fortunes"]],
    ids=["text_model_on_images", "image_model_on_text"],
)
def test_a_model_on_data_of_the_other_kind_is_refused(tmp_path, args):
    write_corpus(tmp_path / "corpus")
    proc = run_cli(
        "vae-train", *args, f"data.root={tmp_path / 'corpus'}", *QUICK, cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    message = last_line(proc.stderr)
    assert "model (" in message and "data=" in message and "model=text_lm" in message
    assert not (tmp_path / "logs").exists()


def test_bad_text_settings_are_all_named_before_anything_is_built():
    from tests.test_config import composed
    from vae.training.config import ConfigError, validate_config

    cfg = composed(
        "model=text_lm",
        "data=fortunes",
        "model.label_smoothing=1.0",
        "model.top_k=0",
        "data.max_tokens=0",
        "data.min_count=0",
        "model.hidden_dim=-1",
    )
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    for key in (
        "model.label_smoothing=1.0",
        "model.top_k=0",
        "data.max_tokens=0",
        "data.min_count=0",
        "model.hidden_dim=-1",
    ):
        assert key in str(error.value)
    validate_config(composed("model=text_lm", "data=fortunes", "model.label_smoothing=0.1"))
