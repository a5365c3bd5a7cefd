"""Data: CIFAR-10 from its on-disk format, latent shards, the loader, toy sets."""
import json
import os

import numpy as np
import pytest
import torch

import common
from conftest import write_cifar_fixture


def test_cifar10_reads_the_release_format(tmp_path):
    raw, labels = write_cifar_fixture(str(tmp_path))
    data = common.load_dataset("cifar10", str(tmp_path))
    assert len(data) == 30 and data.shape == (3, 32, 32) and data.num_classes == 10
    x, y = data.get(torch.tensor([0, 7, 29]))
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [labels[0], labels[7], labels[29]]
    # channel planes: byte 0 is R(0,0), byte 1024 is G(0,0), byte 2048 + 32*5 + 3 is B(5,3)
    lvl = lambda v: (v + 1) * 127.5
    assert torch.isclose(lvl(x[1, 0, 0, 0]), torch.tensor(float(raw[7, 0])))
    assert torch.isclose(lvl(x[1, 1, 0, 0]), torch.tensor(float(raw[7, 1024])))
    assert torch.isclose(lvl(x[1, 2, 5, 3]), torch.tensor(float(raw[7, 2048 + 32 * 5 + 3])))


def test_cifar10_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        def __init__(self, *a, **k):
            raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(common.UserError, match="cifar-10-python.tar.gz"):
        common.load_dataset("cifar10", str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.load_dataset("mnist")


def make_shards(root, n=45, shape=(4, 8, 8), shard_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, *shape, generator=g)
    lab = torch.randint(0, 7, (n,), generator=g)
    batches = ((lat[i:i + 10], lab[i:i + 10]) for i in range(0, n, 10))
    count = common.write_latent_shards(root, batches, shape, 7, "some/vae", 0.18215, 64, shard_size=shard_size)
    return lat, lab, count


def test_latent_shards_round_trip(tmp_path):
    lat, lab, count = make_shards(str(tmp_path))
    assert count == 45
    meta = json.load(open(tmp_path / "meta.json"))
    assert meta["format"] == "latents-v1" and meta["shape"] == [4, 8, 8] and len(meta["shards"]) == 3
    data = common.load_dataset("imagenet-latents", str(tmp_path))
    assert len(data) == 45 and data.shape == (4, 8, 8) and data.num_classes == 7
    idx = torch.tensor([44, 0, 17, 16, 31, 3])                    # across all shards, unordered
    x, y = data.get(idx)
    assert torch.allclose(x, lat[idx].half().float()) and torch.equal(y, lab[idx])


def test_latent_shape_mismatch_is_reported(tmp_path):
    make_shards(str(tmp_path))
    meta = json.load(open(tmp_path / "meta.json"))
    meta["shape"] = [4, 16, 16]
    json.dump(meta, open(tmp_path / "meta.json", "w"))
    with pytest.raises(common.UserError, match="do not match"):
        common.load_dataset("imagenet-latents", str(tmp_path))
    with pytest.raises(common.UserError, match="meta.json missing"):
        common.load_dataset("imagenet-latents", str(tmp_path / "elsewhere"))


def test_encode_latents_from_an_image_folder(tmp_path):
    """The ImageFolder -> shards path with a stand-in encoder (the VAE itself is optional)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    encoder = lambda x: torch.nn.functional.avg_pool2d(x, 4)[:, :2]        # (B, 2, 4, 4) from 16x16 images
    n = common.encode_latents(str(tmp_path / "imgs"), str(tmp_path / "lat"), image_size=16, batch_size=4,
                              scale_factor=0.5, shard_size=4, device="cpu", encoder=encoder)
    data = common.load_dataset("imagenet-latents", str(tmp_path / "lat"))
    assert n == 6 and len(data) == 6 and data.shape == (2, 4, 4) and data.num_classes == 2
    x, y = data.get(torch.arange(6))
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x.abs().max() <= 0.5 + 1e-3                              # scaled by scale_factor, inputs in [-1, 1]


def test_vae_missing_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_diffusers(name, *a, **k):
        if name.startswith("diffusers"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(common.UserError, match="pip install diffusers"):
        common.vae_decode(torch.zeros(1, 4, 8, 8), {"vae": "x", "scale_factor": 0.18215})


def test_loader_shards_and_resumes(tmp_path):
    raw, _ = write_cifar_fixture(str(tmp_path))
    data = common.load_dataset("cifar10", str(tmp_path))
    ranks = [common.Dist(rank=r, world_size=2) for r in range(2)]
    loaders = [common.Loader(data, 4, d, seed=3) for d in ranks]
    seen = [[], []]
    for _ in range(3):                                            # one epoch: 30 // 2 = 15 per rank -> 3 batches of 4
        for r, ld in enumerate(loaders):
            x, _ = ld.next()
            seen[r].append(x)
    a, b = torch.cat(seen[0]), torch.cat(seen[1])
    flat = lambda v: {tuple(row.flatten()[:16].tolist()) for row in v}
    assert not (flat(a) & flat(b))                                # ranks see disjoint samples
    # resume: a new loader restored from the state continues with the same batches
    ld = common.Loader(data, 4, ranks[0], seed=3)
    for _ in range(2):
        ld.next()
    state = ld.state_dict()
    expected = [ld.next()[0] for _ in range(4)]                    # crosses the epoch boundary
    ld2 = common.Loader(data, 4, ranks[0], seed=3)
    ld2.load_state_dict(state)
    assert all(torch.equal(e, ld2.next()[0]) for e in expected)


def test_loader_xflip_uses_the_global_rng(tmp_path):
    write_cifar_fixture(str(tmp_path))
    data = common.load_dataset("cifar10", str(tmp_path))
    ld = common.Loader(data, 30, common.Dist(), seed=0, xflip=True)
    torch.manual_seed(5)
    x, _ = ld.next()
    torch.manual_seed(5)
    flips = torch.rand(30) < 0.5
    plain, _ = data.get(ld._batches[0])
    assert torch.equal(x[flips], plain[flips].flip(-1)) and torch.equal(x[~flips], plain[~flips])
    assert 0 < flips.sum() < 30


@pytest.mark.parametrize("name", common.TOY_SETS)
def test_toy_sets(name):
    data = common.load_dataset(name)
    x, y = data.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 2) and y.min() >= 0 and y.max() == data.num_classes - 1
    assert (x.std(0) > 0.6).all() and (x.std(0) < 1.6).all() and x.mean(0).abs().max() < 0.3
    if name == "checkerboard":                                    # only the cells of one colour
        cells = (x + 2).floor()
        assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


def test_sliced_wasserstein():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 2, generator=g), torch.randn(3000, 2, generator=g)
    assert common.sliced_wasserstein(a, a) == 0
    assert common.sliced_wasserstein(a, b) < 0.06                   # same law, different sizes
    # a pure shift by m along every direction: SW2 = |m| sqrt(E[cos^2]) = |m| / sqrt(2) in 2D
    m = torch.tensor([3.0, 0.0])
    assert abs(common.sliced_wasserstein(a, a + m) - 3 / 2 ** 0.5) < 0.05
    assert common.sliced_wasserstein(a, 2 * b) > 0.3


def test_latents_record_their_vae_and_vae_overrides_it(tmp_path):
    """encode-latents records the VAE (sd-vae-ft-mse unless told otherwise) in meta.json; --vae replaces it
    for decoding."""
    import inspect
    assert inspect.signature(common.encode_latents).parameters["vae_name"].default == "stabilityai/sd-vae-ft-mse"
    make_shards(str(tmp_path))
    assert common.load_dataset("imagenet-latents", str(tmp_path)).meta["vae"] == json.load(open(tmp_path / "meta.json"))["vae"]
    assert common.load_dataset("imagenet-latents", str(tmp_path), vae="/my/vae").meta["vae"] == "/my/vae"
