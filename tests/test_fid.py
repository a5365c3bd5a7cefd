"""FID: the Frechet distance against closed forms and scipy, and the pytorch-fid Inception variant."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import common


def random_psd(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def test_identical_stats_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_psd(64, rng)
    assert abs(common.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    sing = random_psd(64, rng, rank=10)                          # singular covariance: still 0, no NaN
    assert abs(common.frechet_distance(mu, sing, mu, sing)) < 1e-7 * np.trace(sing)


def test_equal_covariances_give_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(32), rng.standard_normal(32), random_psd(32, rng)
    assert np.isclose(common.frechet_distance(mu1, sigma, mu2, sigma), ((mu1 - mu2) ** 2).sum(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_agrees_with_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    d = 48
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_psd(d, rng), random_psd(d, rng)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert np.isclose(common.frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-8)


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(5)
    feats = torch.from_numpy(rng.standard_normal((300, 16)))
    stats = common.FeatureStats(dim=16)
    for chunk in feats.split(70):
        stats.add(chunk.float())
    mu, sigma = stats.finish()
    f32 = feats.float().double().numpy()
    assert np.allclose(mu, f32.mean(0), atol=1e-12)
    assert np.allclose(sigma, np.cov(f32, rowvar=False), atol=1e-10)


def test_quantisation():
    x = torch.tensor([-1.0, -0.9981, 0.0, 0.2, 1.0, 1.7])
    q = common.quantize_images(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() >= 0 and levels.max() <= 255
    assert torch.allclose(q[[0, 4, 5]], torch.tensor([-1.0, 1.0, 1.0]))


def test_fid_pooling_blocks():
    """A, C and the first E block average-pool without counting padding; the last E block max-pools."""
    net = common.FIDInception().net
    ones = torch.ones(1, 1, 5, 5)
    for block in (net.Mixed_5b, net.Mixed_5d, net.Mixed_6b, net.Mixed_6e, net.Mixed_7b):
        assert torch.allclose(block.pool(ones), ones)            # borders stay 1: padding not counted
    assert F.avg_pool2d(ones, 3, 1, 1)[0, 0, 0, 0] < 0.5          # (torchvision's default would give 4/9)
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 9.0
    assert torch.allclose(net.Mixed_7c.pool(spike)[0, 0, 1:4, 1:4], torch.full((3, 3), 9.0))
    assert torch.allclose(net.Mixed_7b.pool(spike)[0, 0, 1:4, 1:4], torch.full((3, 3), 1.0))


def test_state_dict_is_the_standard_layout():
    """Keys and shapes of torchvision's Inception-v3 with 1008 classes and no aux head: the layout of
    pt_inception-2015-12-05-6726825d.pth, which therefore loads unchanged (strict)."""
    from torchvision.models import inception_v3
    ref = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    ours = common.FIDInception().net.state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert ours["fc.weight"].shape == (1008, 2048)


def random_inception(seed=0):
    """Random weights that keep activations alive through the 300 layers (He init, identity BN)."""
    torch.manual_seed(seed)
    net = common.FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def test_forward_random_weights_and_loading(tmp_path):
    net = random_inception()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.net.state_dict(), path)
    loaded = common.load_fid_inception(str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = loaded(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert torch.allclose(feats, net(x), atol=1e-5)
    assert (feats >= 0).all() and feats.std() > 1e-2              # pooled after ReLU, not vanishing
    # resizing is bilinear to 299: a 299 input gives the same features as itself
    assert torch.allclose(loaded(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)), feats, atol=1e-4)


def test_missing_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(common.UserError, match="pt_inception-2015-12-05-6726825d.pth"):
        common.load_fid_inception()
    with pytest.raises(common.UserError, match="not found"):
        common.load_fid_inception(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(common.UserError, match="not the FID Inception"):
        common.load_fid_inception(str(bad))


def test_fid_of_a_set_against_itself_is_small_and_shift_is_large():
    net = random_inception(1)
    a = torch.rand(12, 3, 16, 16) * 2 - 1
    mu_a, s_a = common.inception_stats(a.split(4), net, "cpu")
    mu_b, s_b = common.inception_stats((a.flip(0)).split(6), net, "cpu")
    assert abs(common.frechet_distance(mu_a, s_a, mu_b, s_b)) < 1e-6 * max(1.0, np.trace(s_a))
    mu_c, s_c = common.inception_stats((a * 0.3).split(6), net, "cpu")
    assert common.frechet_distance(mu_a, s_a, mu_c, s_c) > 1e-3


def test_cifar10_reference_stats_are_computed_once_and_cached(tmp_path, monkeypatch):
    from conftest import write_cifar_fixture
    write_cifar_fixture(str(tmp_path), per_batch=2)
    weights = tmp_path / "w.pth"
    torch.save(random_inception(2).net.state_dict(), weights)
    mu, sigma = common.fid_reference("cifar10", str(tmp_path), weights=str(weights), batch_size=4)
    cache = tmp_path / "fid_stats_cifar10_train.npz"
    assert cache.exists() and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    data = common.CIFAR10(str(tmp_path))
    net = common.load_fid_inception(str(weights))
    feats = net(common.quantize_images(data.get(torch.arange(10))[0])).double().numpy()
    assert np.allclose(mu, feats.mean(0), atol=1e-5)
    monkeypatch.setattr(common, "load_fid_inception", lambda *a, **k: pytest.fail("recomputed"))
    mu2, _ = common.fid_reference("cifar10", str(tmp_path))          # from the cache
    assert np.array_equal(mu, mu2)
    with pytest.raises(common.UserError, match="--fid-ref"):
        common.fid_reference("imagenet-latents", str(tmp_path))


def test_cached_weights_need_the_published_hash_and_downloads_are_checked(tmp_path, monkeypatch):
    """A file in the torch hub cache under the published name but with other bytes is refused (its sha256
    does not start with 6726825d); a download goes through torch.hub with check_hash and weights_only."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir()
    torch.save(random_inception().net.state_dict(), cached)
    with pytest.raises(common.UserError, match="does not have the published hash"):
        common.load_fid_inception()
    cached.unlink()
    seen = {}

    def fake_download(url, **kwargs):
        seen.update(kwargs)
        return random_inception().net.state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    common.load_fid_inception()
    assert seen["check_hash"] is True and seen["weights_only"] is True
