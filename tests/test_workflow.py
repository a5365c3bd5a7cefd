"""A researcher's workflow around training: exporting samples (--sample-only --npz / --png-dir), chosen
classes (--class), FID of any exported set (common.py fid / fid-ref), checkpoint snapshots (--snapshot-every,
--keep), --help with the preset's values, what a run prints first and its progress bar, threads on toy data."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import direct
import gcm
import scm
from conftest import ROOT, load_state, run_cli, torchrun
from test_fid import random_inception

TOY = ["--dataset", "moons", "--eval-samples", "64", "--log-every", "10"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wf") / "toy"
    direct.main(TOY + ["--steps", "30", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_data):
    """A class-conditional sCM teacher on digits (a few steps: the files matter here, not the quality)."""
    out = tmp_path_factory.mktemp("wf") / "digits"
    scm.main(["--dataset", "digits", "--data-path", digits_data, "--mode", "diffusion", "--class-cond",
              "--class-dropout", "0.1", "--steps", "4", "--batch-size", "16", "--nfe", "2", "--eval-samples", "16",
              "--out", str(out)])
    return out


def test_export_toy_points(toy_run, tmp_path):
    path = tmp_path / "pts.npz"
    direct.main(["--sample-only", "--ckpt", str(toy_run / "ckpt.pt"), "--n", "100", "--npz", str(path),
                 "--out", str(tmp_path / "s")])
    with np.load(path) as f:
        assert f["arr_0"].dtype == np.float32 and f["arr_0"].shape == (100, 2) and "labels" not in f


def test_export_paths_are_checked_before_sampling(toy_run, tmp_path, capsys):
    """With two samplers the files are OUT-<sampler>-nfe<k>.npz: one that is a folder is refused in one line
    before any sample is drawn, and nothing is written."""
    (tmp_path / "x-euler-nfe2.npz").mkdir()
    code, err = run_cli(direct.main, ["--sample-only", "--ckpt", str(toy_run / "ckpt.pt"), "--euler-steps", "2",
                                      "--npz", str(tmp_path / "x.npz"), "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and len(err) == 1 and "x-euler-nfe2.npz is a folder; it takes a file name" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["x-euler-nfe2.npz"]


def test_export_images_is_deterministic_and_world_size_free(digits_run, digits_data, tmp_path):
    """uint8 NHWC under arr_0, one file per NFE, labels saved; the same seed gives the same samples, another
    seed others; two processes under torchrun write exactly what one process writes."""
    def export(name, *extra):
        scm.main(["--sample-only", "--ckpt", str(digits_run / "ckpt.pt"), "--n", "40", "--nfe", "1", "2",
                  "--npz", str(tmp_path / f"{name}.npz"), "--fid-batch", "16", "--eval-samples", "0",
                  "--out", str(tmp_path / name), "--data-path", digits_data, *extra])
        return [np.load(tmp_path / f"{name}-default-nfe{k}.npz") for k in (1, 2)]
    a, b, c = export("a"), export("b"), export("c", "--seed", "1")
    for f in a:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (40, 8, 8, 1) and f["labels"].shape == (40,)
    assert all(np.array_equal(x["arr_0"], y["arr_0"]) and np.array_equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["arr_0"], c[0]["arr_0"])
    res = torchrun("scm.py", "--sample-only", "--ckpt", str(digits_run / "ckpt.pt"), "--n", "40", "--nfe", "1", "2",
                   "--npz", str(tmp_path / "two.npz"), "--fid-batch", "16", "--eval-samples", "0", "--device", "cpu",
                   "--out", str(tmp_path / "two"), "--data-path", digits_data)
    assert res.returncode == 0, res.stderr[-3000:]
    for k, f in zip((1, 2), a):
        two = np.load(tmp_path / f"two-default-nfe{k}.npz")
        assert np.array_equal(two["arr_0"], f["arr_0"]) and np.array_equal(two["labels"], f["labels"])


def test_chosen_classes_and_png_dir(digits_run, digits_data, tmp_path):
    outs = {}
    for k in (3, 5):
        path = tmp_path / f"c{k}.npz"
        scm.main(["--sample-only", "--ckpt", str(digits_run / "ckpt.pt"), "--n", "12", "--nfe", "2", "--class", str(k),
                  "--npz", str(path), "--png-dir", str(tmp_path / f"png{k}"), "--eval-samples", "0",
                  "--out", str(tmp_path / f"o{k}"), "--data-path", digits_data])
        with np.load(path) as f:
            outs[k] = f["arr_0"]
            assert (f["labels"] == k).all()
    assert not np.array_equal(outs[3], outs[5])                    # the labels reach the network
    pngs = sorted(os.listdir(tmp_path / "png3"))
    assert pngs == [f"{i:06d}.png" for i in range(12)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png3" / pngs[4])), outs[3][4, :, :, 0])
    several = tmp_path / "mix.npz"
    scm.main(["--sample-only", "--ckpt", str(digits_run / "ckpt.pt"), "--n", "6", "--nfe", "2", "--class", "1", "7",
              "--npz", str(several), "--eval-samples", "0", "--out", str(tmp_path / "m"), "--data-path", digits_data])
    assert np.load(several)["labels"].tolist() == [1, 7, 1, 7, 1, 7]


def test_fid_commands_on_a_folder_and_an_npz(tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    torch.save(random_inception(2).net.state_dict(), weights)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "same.npz", arr_0=images)
    np.savez(tmp_path / "other.npz", arr_0=(images // 4).astype(np.uint8))
    stats = tmp_path / "ref.npz"
    common._main(["fid-ref", str(folder), "--out", str(stats), "--fid-weights", str(weights), "--batch-size", "5"])
    with np.load(stats) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    capsys.readouterr()
    fids = {}
    for name in ("same", "other"):
        common._main(["fid", str(tmp_path / f"{name}.npz"), "--ref", str(stats), "--fid-weights", str(weights)])
        fids[name] = float(capsys.readouterr().out.strip().split(": ")[-1])
    assert abs(fids["same"]) < 1e-3 and fids["other"] > 1.0
    code, err = run_cli(common._main, ["fid", str(tmp_path / "nothing"), "--ref", str(stats)], capsys)
    assert code == 2 and len(err) == 1 and "neither an .npz file nor a folder" in err[0]


def test_snapshots_rotate_and_sample(tmp_path, capsys):
    """--snapshot-every 1 (kimg) at batch 256: a snapshot every 4 steps, ckpt-{kimg:06d}.pt, the newest 2 kept;
    each is printed and logged; --sample-only reads a snapshot."""
    out = tmp_path / "run"
    direct.main(TOY + ["--steps", "20", "--batch-size", "256", "--snapshot-every", "1", "--keep", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    snaps = sorted(f for f in os.listdir(out) if f.startswith("ckpt-"))
    assert snaps == ["ckpt-000004.pt", "ckpt-000005.pt"]
    assert load_state(out / "ckpt-000004.pt")["step"] == 16 and "snapshot" in printed and "removed ckpt-000001.pt" in printed
    logged = [json.loads(line) for line in open(out / "log.jsonl") if "snapshot" in line]
    assert [r["snapshot"] for r in logged] == [f"ckpt-{k:06d}.pt" for k in range(1, 6)]
    direct.main(["--sample-only", "--ckpt", str(out / "ckpt-000004.pt"), "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "eval.json").exists()


def test_help_shows_the_preset_values(capsys):
    with pytest.raises(SystemExit) as e:
        gcm.main(["--dataset", "digits", "--variant", "vu", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "[preset digits: 1500]" in text and "[preset digits: vu]" in text and "[preset digits: 0.005]" in text
    with pytest.raises(SystemExit):
        direct.main(["--help"])
    assert "[set by the preset of --dataset]" in " ".join(capsys.readouterr().out.split())


def test_first_lines_and_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    direct.main(TOY + ["--steps", "20", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert first.startswith("direct.py (Direct Models") and "preset toy (moons)" in first and "M parameters" in first
    assert "CPU" in first and str(tmp_path / "r") in first
    assert "kimg/s" in err and "loss=" in err


def test_toy_runs_use_one_thread_unless_told(tmp_path):
    threads = torch.get_num_threads()
    direct.main(TOY + ["--steps", "2", "--out", str(tmp_path / "a")])
    assert json.load(open(tmp_path / "a" / "config.json"))["threads"] == 1
    direct.main(TOY + ["--steps", "2", "--threads", "2", "--out", str(tmp_path / "b")])
    assert json.load(open(tmp_path / "b" / "config.json"))["threads"] == 2
    assert torch.get_num_threads() == threads                         # restored after the run
