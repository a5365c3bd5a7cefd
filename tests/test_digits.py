"""--dataset digits: scikit-learn's 8x8 digits as real images on a CPU. The data split, the classifier behind
the digits figure (accuracy, determinism, cache), the Frechet distance against scipy on known Gaussians,
floor and ceiling, the sample files of an image run, and a short run per method that must beat a
threshold far below the ceiling."""
import builtins
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import common


def test_split_is_fixed_stratified_and_scaled():
    train, held = common.Digits("train"), common.Digits("held-out")
    assert (len(train), len(held)) == (1437, 360) and train.shape == (1, 8, 8) and train.num_classes == 10
    assert torch.equal(held.labels.bincount(), torch.full((10,), 36))
    for d in (train, held):
        levels = (d.images + 1) * 8                                # 17 grey levels 0..16 <-> [-1, 1]
        assert torch.equal(levels, levels.round()) and levels.min() == 0 and levels.max() == 16
    from sklearn.datasets import load_digits
    raw = torch.from_numpy(load_digits().images).float() / 8 - 1
    # every image lands in exactly one split, and the split does not depend on the call
    assert len(train) + len(held) == len(raw)
    assert torch.equal(common.Digits("held-out").images, held.images)
    x, y = train.get(torch.tensor([0, 5]))
    assert x.shape == (2, 1, 8, 8) and y.dtype == torch.int64
    assert common.load_dataset("digits").kind == "image"


def test_missing_scikit_learn_is_one_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *a, **k):
        if name.startswith("sklearn"):
            raise ImportError("no sklearn")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(common.UserError, match="pip install scikit-learn"):
        common.Digits()


def test_classifier_accuracy_and_cache(digits_data):
    net, accuracy = common.digits_classifier(digits_data)
    print(f"digits classifier held-out accuracy {accuracy:.4f}")
    assert accuracy >= 0.97
    held = common.Digits("held-out")
    with torch.no_grad():
        measured = float((net(held.images).argmax(1) == held.labels).float().mean())
    assert measured == pytest.approx(accuracy)
    again, acc2 = common.digits_classifier(digits_data)              # read from the cache, not retrained
    assert acc2 == accuracy and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                                    again.state_dict().values()))


def test_classifier_training_is_deterministic():
    a, _ = common._train_digits_classifier(epochs=1)
    b, _ = common._train_digits_classifier(epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_frechet_distance_of_known_gaussians_matches_scipy():
    """The statistics path of the digits figure (mean, covariance of feature samples, frechet_distance) on
    samples of two known Gaussians: the estimate approaches the closed form computed with scipy's sqrtm."""
    rng = np.random.default_rng(0)
    d = 8
    A, B = rng.standard_normal((d, d)) / np.sqrt(d), rng.standard_normal((d, d)) / np.sqrt(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = A @ A.T + 0.1 * np.eye(d), B @ B.T + 0.1 * np.eye(d)
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    n = 200_000
    x1 = mu1 + rng.standard_normal((n, d)) @ np.linalg.cholesky(s1).T
    x2 = mu2 + rng.standard_normal((n, d)) @ np.linalg.cholesky(s2).T
    est = common.frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert est == pytest.approx(exact, rel=0.02)
    assert common.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)


def test_floor_and_ceiling(digits_data):
    q = common.DigitsQuality(digits_data)
    floor, ceiling = q.floor(), q.ceiling()
    print(f"digits floor {floor['fd']:.2f} ({floor['modes']:.2f} classes), ceiling {ceiling['fd']:.1f}")
    assert floor["fd"] < ceiling["fd"] / 30 and floor["modes"] > 9.9
    assert sum(floor["class_share"]) == pytest.approx(1, abs=1e-3)
    one_class = common.Digits("train")
    only_zeros = one_class.images[one_class.labels == 0]
    collapsed = q.score(only_zeros)                                   # mode collapse shows in both figures
    assert collapsed["modes"] < 1.5 and collapsed["fd"] > 10 * floor["fd"]


METHOD_RUNS = {
    # method: (argv, key of eval.json to score, NFE, threshold on the FD). Fewer steps than the presets.
    "direct": (["--steps", "300"], "fd", "1", None),
}


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_short_digits_run_beats_threshold(method, digits_data, tmp_path):
    pytest.skip("thresholds pending")
