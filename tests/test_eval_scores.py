"""Active units on a model with units switched off by hand; label KL and classifier score in
closed form; the scoring classifier learns digits and is cached by data and settings."""

from __future__ import annotations

import math

import pytest
import torch

from vae.data import DigitsDataModule
from vae.eval import (
    ACTIVE_UNIT_THRESHOLD,
    ActiveUnits,
    ClassifierSettings,
    active_units,
    classifier_score,
    count_active_units,
    fid_unavailable_reason,
    label_kl,
    load_or_train_classifier,
    predict_probabilities,
)
from vae.eval.sample_scores import predicted_label_histogram, reverse_label_kl
from vae.models import GaussianVAE

OFF = (1, 4)


def model_with_units_off(off=OFF) -> GaussianVAE:
    """A GaussianVAE whose posterior means of the ``off`` units ignore x (mu_d = 0.3 always)."""
    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 8, 8), hidden_dims=[32], latent_dim=6).eval()
    head = model.encoder.mu_head
    with torch.no_grad():
        head.weight.mul_(20.0)  # every remaining unit varies clearly with x
        for d in off:
            head.weight[d].zero_()
            head.bias[d] = 0.3
    return model


def test_active_units_count_exactly_the_units_switched_off():
    model = model_with_units_off()
    images = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    count, variance = active_units(model, images.split(64))
    assert count == 6 - len(OFF)
    assert torch.equal(variance[list(OFF)], torch.zeros(len(OFF), dtype=torch.float64))
    on = [d for d in range(6) if d not in OFF]
    assert bool((variance[on] > ACTIVE_UNIT_THRESHOLD).all()), variance
    # The same variance as one pass over all examples (population variance, over examples).
    with torch.no_grad():
        mu = model.encode(images)[0].double()
    torch.testing.assert_close(variance, mu.var(0, unbiased=False))


def test_threshold_is_strict_and_burdas():
    assert ACTIVE_UNIT_THRESHOLD == 0.01
    variance = torch.tensor([0.0, 0.009, 0.01, 0.0101, 2.0], dtype=torch.float64)
    assert count_active_units(variance) == 2
    assert count_active_units(variance, threshold=0.0) == 4


def test_active_units_survive_a_large_offset():
    # Variance 0.0121 around a mean of 1000: naive float32 sums would lose it entirely.
    generator = torch.Generator().manual_seed(0)
    mu = 1000.0 + 0.11 * torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    stats = ActiveUnits(2)
    for batch in mu.float().split(1000):
        stats.update(batch)
    reference = mu.float().double().var(0, unbiased=False)
    torch.testing.assert_close(stats.variance(), reference, rtol=1e-6, atol=1e-9)
    assert int(stats.compute()) == 2


def one_hot(labels, num_classes=10):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), num_classes).double()


BALANCED = torch.arange(10).repeat(20)


def test_label_kl_is_zero_for_matching_histograms_and_log10_for_one_class():
    assert float(label_kl(one_hot(BALANCED), BALANCED)) == pytest.approx(0.0, abs=1e-12)
    one_class = one_hot(torch.zeros(50, dtype=torch.long))
    assert float(label_kl(one_class, BALANCED)) == pytest.approx(math.log(10.0))


def test_forward_label_kl_charges_a_missing_mode_only_log_10_over_9():
    nine_classes = one_hot(torch.arange(9).repeat(10))  # class 9 never generated
    # KL(uniform over 9 || uniform over 10) = log(10 / 9)
    assert float(label_kl(nine_classes, BALANCED)) == pytest.approx(math.log(10 / 9))


def test_reverse_label_kl_is_infinite_for_a_class_never_generated():
    # Soft predictions that never make class 0 the argmax, 9 classes equally often: the mean
    # of p(y|x) still gives class 0 mass, the histogram of predicted labels gives it none.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(900, 10, generator=generator, dtype=torch.float64)
    logits[torch.arange(900), torch.arange(1, 10).repeat(100)] += 20.0
    probabilities = torch.softmax(logits, -1)
    assert float(probabilities.mean(0)[0]) > 0.0
    generated = predicted_label_histogram(probabilities)
    assert float(generated[0]) == 0.0
    torch.testing.assert_close(generated[1:], torch.full((9,), 1 / 9, dtype=torch.float64))

    assert float(label_kl(probabilities, BALANCED)) == pytest.approx(math.log(10 / 9), abs=1e-6)
    assert float(reverse_label_kl(probabilities, BALANCED)) == math.inf


def test_reverse_label_kl_is_zero_for_matching_histograms_and_finite_for_rare_classes():
    assert float(reverse_label_kl(one_hot(BALANCED), BALANCED)) == pytest.approx(0.0, abs=1e-12)
    # Class 0 generated half as often as the data has it, the others a little more often.
    rare = torch.cat([torch.zeros(5, dtype=torch.long), torch.arange(1, 10).repeat(21)])
    h_gen = torch.bincount(rare, minlength=10).double() / rare.numel()
    expected = float((0.1 * (0.1 / h_gen).log()).sum())
    assert float(reverse_label_kl(one_hot(rare), BALANCED)) == pytest.approx(expected, rel=1e-12)
    assert 0.0 < expected < math.inf


def test_predicted_label_histogram_refuses_a_flat_vector():
    with pytest.raises(ValueError, match="num_samples, num_classes"):
        predicted_label_histogram(torch.full((10,), 0.1))


def test_classifier_score_bounds_and_a_direct_formula():
    assert float(classifier_score(one_hot(BALANCED))) == pytest.approx(10.0)
    same = torch.full((30, 10), 0.1, dtype=torch.float64)
    assert float(classifier_score(same)) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(40, 10, generator=generator, dtype=torch.float64), -1)
    marginal = p.mean(0)
    direct = math.exp(float((p * (p.log() - marginal.log())).sum(1).mean()))
    assert float(classifier_score(p)) == pytest.approx(direct, rel=1e-12)
    assert 1.0 < direct < 10.0


def test_samples_can_score_above_the_real_images_score():
    # Real images: balanced classes, each labelled with probability 0.7. Samples: balanced,
    # each labelled with probability 0.99. The real images' score is no ceiling.
    def confident(level):
        rest = (1.0 - level) / 9
        return torch.full((10, 10), rest, dtype=torch.float64).fill_diagonal_(level).repeat(5, 1)

    real, samples = classifier_score(confident(0.7)), classifier_score(confident(0.99))
    assert 1.0 < float(real) < float(samples) < 10.0


def test_classifier_score_refuses_a_flat_vector():
    with pytest.raises(ValueError, match="num_samples, num_classes"):
        classifier_score(torch.full((10,), 0.1))


@pytest.fixture(scope="module")
def digits():
    datamodule = DigitsDataModule(binarize="none")
    datamodule.setup()
    return datamodule


def test_classifier_trains_once_and_is_loaded_from_the_cache(digits, tmp_path):
    train, test = digits.train_split, digits.test_split
    settings = ClassifierSettings(steps=300)
    classifier, path, trained = load_or_train_classifier(
        tmp_path, "digits", train.images, train.labels, 10, settings
    )
    assert trained and path.is_file() and path.parent.parent == tmp_path
    assert path.name.startswith("digits-")
    probabilities = predict_probabilities(classifier, test.images)
    accuracy = float((probabilities.argmax(-1) == test.labels).double().mean())
    assert accuracy > 0.85, accuracy
    # Real digits score well above 1 and match their own label histogram closely.
    assert float(classifier_score(probabilities)) > 5.0
    assert float(label_kl(probabilities, test.labels)) < 0.05

    again, same_path, trained_again = load_or_train_classifier(
        tmp_path, "digits", train.images, train.labels, 10, settings
    )
    assert not trained_again and same_path == path
    torch.testing.assert_close(predict_probabilities(again, test.images), probabilities)

    # Other settings or other data get their own cache entry.
    other = ClassifierSettings(steps=10)
    _, other_path, _ = load_or_train_classifier(
        tmp_path, "digits", train.images, train.labels, 10, other
    )
    _, flipped_path, _ = load_or_train_classifier(
        tmp_path, "digits", 1.0 - train.images, train.labels, 10, other
    )
    assert len({path, other_path, flipped_path}) == 3


def test_a_corrupt_cache_file_is_rebuilt(digits, tmp_path):
    train = digits.train_split
    settings = ClassifierSettings(steps=5)
    _, path, _ = load_or_train_classifier(
        tmp_path, "digits", train.images, train.labels, 10, settings
    )
    path.write_bytes(b"not a checkpoint")
    _, again, trained = load_or_train_classifier(
        tmp_path, "digits", train.images, train.labels, 10, settings
    )
    assert trained and again == path


@pytest.mark.parametrize("key,value", [("steps", 0), ("hidden_dim", -1), ("lr", 0.0)])
def test_classifier_settings_name_the_bad_key(key, value):
    with pytest.raises(ValueError, match=f"eval.classifier.{key}"):
        ClassifierSettings(**{key: value})


def test_fid_is_skipped_with_a_one_line_reason_when_weights_are_missing():
    reason = fid_unavailable_reason()
    assert reason is None or (reason.startswith("FID skipped: ") and "\n" not in reason)
