"""The contract of every method script (README, "When things go wrong"): bad input is one line and exit code
2 with nothing left behind; stop signals checkpoint and resume bit-identically (one process, and two under
torchrun); non-finite updates never replace a good checkpoint; killed processes' temporary files are
cleaned up; log.jsonl holds each step once; --resume refuses changes to what a checkpoint holds; data
files never run code."""
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import benchmark
import common
import decm
import direct
import gcm
import scm
from conftest import ROOT, assert_states_equal, cpu_env, free_port, load_state, run_cli, write_cifar_fixture

MAINS = {"direct": direct.main, "gcm": gcm.main, "scm": scm.main, "decm": decm.main, "common": common._main,
         "benchmark": benchmark.main}
TOY = ["--dataset", "moons", "--eval-samples", "64", "--log-every", "10"]


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback, nothing created

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Data and checkpoint files for the table below, made once."""
    root = tmp_path_factory.mktemp("bad")
    files = {"file": root / "a_file.txt"}
    files["file"].write_text("not a folder")
    # a checkpoint of each kind: an existing run (direct, moons), an sCM student (not a teacher), junk
    run = root / "existing"
    cfg = direct.parse_config(["--dataset", "moons", "--out", str(run)])
    common.save_checkpoint(str(run / "ckpt.pt"), {"cfg": cfg, "step": 3})
    files["run"] = run
    cond = root / "cond.pt"                                   # a class-conditional one (moons: classes 0, 1)
    common.save_checkpoint(str(cond), {"cfg": direct.parse_config(["--dataset", "moons", "--class-cond", "--out",
                                                                   str(root / "c")]), "step": 3})
    files["cond"] = cond
    files["dir_npz"] = root / "folder.npz"
    files["dir_npz"].mkdir()
    files["no_classes"] = root / "images"                      # an image folder without class sub-folders
    files["no_classes"].mkdir()
    files["misfit"] = root / "misfit.pt"                       # weights of another shape
    common.save_checkpoint(str(files["misfit"]), {"cfg": cfg, "step": 3, "ema_v": {"net.0.weight": torch.zeros(3)}})
    files["ckpt_dir"] = root / "ckpt_dir"                      # a run folder whose ckpt.pt is a folder
    (files["ckpt_dir"] / "ckpt.pt").mkdir(parents=True)
    for key, name in (("log_dir", "log.jsonl"), ("eval_dir", "eval.json"), ("samples_file", "samples")):
        files[key] = root / key                                # a folder where a run's file goes, or the reverse
        common.save_checkpoint(str(files[key] / "ckpt.pt"), {"cfg": {**cfg, "out": str(files[key])}, "step": 3})
        if name == "samples":
            (files[key] / name).write_text("")
        else:
            (files[key] / name).mkdir()
    scm_cfg = scm.parse_config(["--dataset", "moons", "--out", str(root / "s")])
    common.save_checkpoint(str(root / "sct.pt"), {"cfg": scm_cfg, "step": 1})
    files["sct"] = root / "sct.pt"
    files["junk"] = root / "junk.pt"
    files["junk"].write_bytes(b"\x00 not a zip archive")
    # CIFAR-10: a good copy, then broken variants of data_batch_1
    for name, breakage in (("cifar_ok", None), ("cifar_text", b"plain text, not a pickle"),
                           ("cifar_shape", "shape"), ("cifar_labels", "labels"), ("cifar_evil", "evil")):
        folder = root / name
        write_cifar_fixture(str(folder))
        batch_path = folder / "cifar-10-batches-py" / "data_batch_1"
        if breakage == "shape":
            batch_path.write_bytes(pickle.dumps({b"data": np.zeros((6, 100), np.uint8), b"labels": [0] * 6}, 2))
        elif breakage == "labels":
            batch_path.write_bytes(pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [12] * 6}, 2))
        elif breakage == "evil":
            batch_path.write_bytes(pickle.dumps(Evil(str(root / "pwned")), 2))
        elif breakage:
            batch_path.write_bytes(breakage)
        files[name] = folder
    # latent shards: good ones, then broken variants
    for name in ("lat_json", "lat_keys", "lat_shard", "lat_labels"):
        folder = root / name
        make_latents(folder)
        meta = json.load(open(folder / "meta.json"))
        if name == "lat_json":
            (folder / "meta.json").write_text("{not json")
        elif name == "lat_keys":
            del meta["shards"]
            (folder / "meta.json").write_text(json.dumps(meta))
        elif name == "lat_shard":
            torch.save([torch.zeros(3)], folder / meta["shards"][0]["file"])
        else:
            torch.save({"latents": torch.zeros(5, 4, 8, 8, dtype=torch.float16), "labels": torch.full((5,), 99)},
                       folder / meta["shards"][0]["file"])
    files.update({k: root / k for k in ("lat_json", "lat_keys", "lat_shard", "lat_labels")})
    make_latents(root / "lat_ok")
    files["lat_ok"] = root / "lat_ok"
    files["fid_weights"] = root / "inception.pth"
    torch.save(common.FIDInception().net.state_dict(), files["fid_weights"])
    # FID's inputs: sample files of 0, 1 and 2 images; statistics of another dimension, with NaN, and good ones
    for n in (0, 1, 2):
        files[f"npz{n}"] = root / f"images{n}.npz"
        np.savez(files[f"npz{n}"], arr_0=np.zeros((n, 8, 8, 3), np.uint8))
    for name, mu, sigma in (("stats512", np.zeros(512), np.eye(512)), ("stats_nan", np.full(2048, np.nan), np.eye(2048)),
                            ("stats_ok", np.zeros(2048), np.eye(2048))):
        files[name] = root / f"{name}.npz"
        np.savez(files[name], mu=mu, sigma=sigma)
    return files


class Evil:
    """A pickle whose loading would create a file (any code could run in its place)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_latents(folder):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 4, 8, 8, generator=g), torch.randint(0, 7, (5,), generator=g))]
    common.write_latent_shards(str(folder), batches, (4, 8, 8), 7, "x", 0.18215, 64, shard_size=5)


def bad_inputs(f):
    """(method, argv, part of the message) for at least 40 bad inputs; f: the files of `bad_files`."""
    return [
        ("direct", ["--lr", "0"], "--lr must be a finite number > 0"),
        ("direct", ["--lr", "nan"], "--lr must be a finite number > 0"),
        ("direct", ["--lr", "inf"], "--lr must be a finite number > 0"),
        ("gcm", ["--lr=-1e-3"], "--lr must be"),
        ("direct", ["--steps", "-1"], "--steps must be >= 0"),
        ("direct", ["--log-every", "0"], "--log-every must be >= 1"),
        ("scm", ["--ckpt-every", "0"], "--ckpt-every must be >= 1"),
        ("gcm", ["--sample-every", "0"], "--sample-every must be >= 1"),
        ("direct", ["--snapshot-every", "0"], "--snapshot-every must be >= 1"),
        ("direct", ["--keep", "0"], "--keep must be >= 1"),
        ("decm", ["--n", "0"], "--n must be >= 1"),
        ("gcm", ["--nfe", "1", "0"], "--nfe values must be >= 1"),
        ("direct", ["--max-skips", "0"], "--max-skips must be >= 1"),
        ("direct", ["--batch-size", "0"], "--batch-size must be >= 1"),
        ("direct", ["--batch-size", "8", "--batch-gpu", "3"], "--batch-gpu 3 does not divide"),
        ("direct", ["--eval-samples", "-1"], "--eval-samples must be >= 0"),
        ("direct", ["--threads", "0"], "--threads must be >= 1"),
        ("direct", ["--ema-decay", "1.5"], "--ema-decay must lie in [0, 1)"),
        ("direct", ["--grad-clip", "-1"], "--grad-clip must be >= 0"),
        ("direct", ["--device", "cuda"], "no CUDA device"),
        ("direct", ["--out", str(f["file"])], "is a file, not a folder"),
        ("direct", ["--out", str(f["run"])], "already holds a run"),
        ("gcm", ["--resume"], "no checkpoint"),
        ("direct", ["--out", str(f["run"]), "--resume", "--model", "DiT-T/2"], "started with other settings"),
        ("direct", ["--out", str(f["run"]), "--resume", "--batch-size", "64"], "--batch-size 256 -> 64"),
        ("direct", ["--model", "DiT-T/2"], "square images"),
        ("direct", ["--model", "ResNet"], "unknown model"),
        ("direct", ["--dataset", "mnist"], "invalid choice"),
        ("direct", ["--no-such-flag"], "unrecognized arguments"),
        ("direct", ["--class", "3"], "unconditional"),
        ("direct", ["--npz", "x.npz"], "--npz / --png-dir export samples with --sample-only"),
        ("scm", ["--tangent-c", "-1"], "--tangent-c must be >= 0"),
        ("scm", ["--mode", "scd"], "needs --teacher"),
        ("scm", ["--mode", "scd", "--teacher", str(f["sct"])], "must be a diffusion model"),
        ("scm", ["--mode", "scd", "--teacher", str(f["junk"])], "not a readable checkpoint"),
        ("gcm", ["--mmd-group", "3"], "--mmd-group 3 does not divide"),
        ("gcm", ["--eps", "0"], "--eps must be positive"),
        ("decm", ["--freq", "0"], "--freq must be >= 1"),
        ("decm", ["--eta", "abc"], "--eta takes a number or auto"),
        ("decm", ["--losses", "fm,xyz"], "--losses takes a comma list"),
        ("decm", ["--teacher", str(f["sct"])], "written by scm.py, not decm.py"),
        ("direct", ["--dt", "0.7"], "--dt must lie in (0, 0.5)"),
        ("direct", ["--nfe", "2"], "one-step sampler"),
        # what a run needs only at its end is checked at its start
        ("direct", ["--dataset", "imagenet-latents", "--data-path", str(f["lat_ok"]), "--model", "DiT-T/2"],
         "needs the VAE from the `diffusers` package"),
        ("gcm", ["--dataset", "cifar10", "--data-path", str(f["cifar_ok"]), "--model", "DiT-T/2", "--fid", "100",
                 "--fid-weights", str(f["file"])], "could not get the FID Inception weights"),
        ("gcm", ["--dataset", "cifar10", "--data-path", str(f["cifar_ok"]), "--model", "DiT-T/2", "--fid", "100",
                 "--fid-weights", str(f["fid_weights"]), "--fid-ref", str(f["run"] / "none.npz")],
         "FID reference statistics not found"),
        # cluster events: output paths and every flag's domain, before any work, at every entry point
        ("direct", ["--out", "/proc/run"], "--out /proc/run cannot be written"),
        ("direct", ["--out", str(f["file"] / "sub")], "lies under"),
        ("direct", ["--out", str(f["file"].parent / ("x" * 300))], "is too long"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--n", "-1"], "--n must be >= 1"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--npz", str(f["dir_npz"])],
         "is a folder; it takes a file name"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--npz", "/proc/x.npz"], "cannot be written"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--npz", str(f["file"] / "x.npz")],
         "lies under"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--png-dir", str(f["file"])],
         "--png-dir " + str(f["file"]) + " is a file"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--class", "1"], "unconditional"),
        ("direct", ["--sample-only", "--ckpt", str(f["cond"]), "--class", "0", "2"], "--class 2: the classes of moons"),
        ("direct", ["--sample-only", "--ckpt", str(f["cond"]), "--class", "-1"], "--class -1"),
        ("direct", ["--class-cond", "--class", "5"], "--class 5: the classes of moons are 0 .. 1"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--model", "DiT-S/2"], "drop --model"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--lr", "0.1"], "drop --lr 0.1"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--resume"], "drop --resume"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--seed", "-2"], "--seed must be >= 0"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--device", "cuda"], "no CUDA device"),
        ("direct", ["--ckpt", str(f["run"] / "ckpt.pt")], "--ckpt is read by --sample-only"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt")], "has no 'ema_v' state"),
        ("direct", ["--sample-only", "--ckpt", str(f["misfit"])], "its 'ema_v' state does not fit"),
        ("direct", ["--out", str(f["ckpt_dir"])], "ckpt.pt is not a file"),
        ("direct", ["--out", str(f["log_dir"]), "--resume"], "log.jsonl is not a file"),
        ("direct", ["--out", str(f["eval_dir"]), "--resume"], "eval.json is not a file"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--out", str(f["samples_file"])],
         "samples is not a folder"),
        ("direct", ["--keep", "2"], "give --snapshot-every"),
        ("direct", ["--ema-halflife-kimg", "-1"], "--ema-halflife-kimg must be a finite number > 0"),
        ("direct", ["--ema-halflife-kimg", "inf"], "--ema-halflife-kimg must be a finite number > 0"),
        ("direct", ["--dataset", "digits", "--data-path", str(f["file"])], "--data-path " + str(f["file"]) + " is a file"),
        ("direct", ["--data-path", str(f["cifar_ok"])], "--data-path does nothing for --dataset moons"),
        ("direct", ["--fid", "10"], "--fid does nothing for --dataset moons"),
        ("direct", ["--vae", "x"], "--vae does nothing"),
        ("direct", ["--xflip"], "--xflip does nothing"),
        ("direct", ["--seed", str(2 ** 32)], "--seed must lie in 0 .. 2^32 - 1"),
        ("direct", ["--threads", "100000"], "--threads must lie in 1 .. "),
        ("direct", ["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        ("scm", ["--P-mean", "inf"], "--P-mean must be a finite number"),
        ("gcm", ["--mmd-sigma", "nan"], "--mmd-sigma must be"),
        ("gcm", ["--dist-a", "3"], "--dist-a and --dist-b of the sine density must lie in [0, 2]"),
        ("gcm", ["--betas", "1", "0.9"], "--betas must lie in [0, 1)"),
        ("gcm", ["--diag-std", "0"], "--diag-std must be positive"),
        ("decm", ["--eta", "inf"], "--eta must be > 0 and finite"),
        ("decm", ["--fm-cos", "-1"], "--fm-cos must be >= 0"),
        ("decm", ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        ("common", ["fid-ref", str(f["cifar_ok"]), "--out", str(f["dir_npz"])], "is a folder; it takes a file name"),
        ("common", ["fid-ref", str(f["cifar_ok"]), "--out", "/proc/stats.npz"], "cannot be written"),
        ("common", ["fid-ref", "--data-path", str(f["file"])], "is a file, not a folder"),
        ("common", ["fid", str(f["cifar_ok"]), "--ref", str(f["file"]), "--batch-size", "0"], "--batch-size must be >= 1"),
        ("common", ["encode-latents", "--images", str(f["no_classes"]), "--out", str(f["file"])], "is a file, not a folder"),
        ("common", ["encode-latents", "--images", str(f["no_classes"]), "--image-size", "12"], "a multiple of 8"),
        ("common", ["encode-latents", "--images", str(f["no_classes"]), "--scale-factor", "inf"], "finite number"),
        ("common", ["encode-latents", "--images", str(f["no_classes"]), "--shard-size", "0"], "--shard-size must be"),
        ("common", ["encode-latents", "--images", str(f["no_classes"]), "--out", str(f["no_classes"] / "lat")],
         "is not an ImageFolder"),
        # the tools around training (the FID commands, the benchmark) and toy samples as images
        ("common", ["fid", str(f["npz0"]), "--ref", str(f["stats_ok"])], "holds 0 image(s); FID's covariance needs"),
        ("common", ["fid", str(f["npz1"]), "--ref", str(f["stats_ok"])], "holds 1 image(s)"),
        ("common", ["fid-ref", str(f["npz1"]), "--out", str(f["file"].parent / "new" / "s.npz")], "holds 1 image(s)"),
        ("common", ["fid", str(f["npz2"]), "--ref", str(f["stats512"])], "holds 512-d statistics"),
        ("common", ["fid", str(f["npz2"]), "--ref", str(f["stats_nan"])], "hold NaN or infinite values"),
        ("benchmark", ["--only", "no/such-entry"], "--only: no entry named no/such-entry"),
        ("benchmark", ["--model", "DiT-Q/9"], "--model DiT-Q/9: not one of"),
        ("direct", ["--sample-only", "--ckpt", str(f["run"] / "ckpt.pt"), "--png-dir", str(f["file"].parent / "png")],
         "are 2D points: --npz writes them"),
    ] + [(m, ["--dataset", ds, "--data-path", str(f[key]), "--model", "DiT-T/2"], msg) for m, ds, key, msg in (
        ("direct", "cifar10", "cifar_text", "is not a CIFAR-10 batch"),
        ("gcm", "cifar10", "cifar_shape", "must be a uint8 array of shape [n, 3072]"),
        ("direct", "cifar10", "cifar_labels", "integers in 0..9"),
        ("direct", "cifar10", "cifar_evil", "is not allowed in a CIFAR-10 batch"),
        ("direct", "imagenet-latents", "lat_json", "is not JSON"),
        ("direct", "imagenet-latents", "lat_keys", "lacks shards"),
        ("scm", "imagenet-latents", "lat_shard", "is not a dict with latents"),
        ("direct", "imagenet-latents", "lat_labels", "labels must lie in 0..6"),
    )]


def test_bad_inputs_are_one_line_with_nothing_left(bad_files, tmp_path, capsys):
    cases = bad_inputs(bad_files)
    assert len(cases) >= 40
    before = {str(p): sorted(os.listdir(p)) for p in (bad_files["run"],)}
    failures = []
    for method, argv, message in cases:
        out = tmp_path / f"out-{len(failures)}"
        args = (["--dataset", "moons"] if "--dataset" not in argv else []) + argv
        if "--out" not in args:
            args += ["--out", str(out)]
        if method in ("common", "benchmark"):
            args = argv
        code, err = run_cli(MAINS[method], args, capsys)
        if not (code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
                and not out.exists()):
            failures.append(f"{method} {' '.join(argv)} -> exit {code}, {err[:3]}, out left: {out.exists()}")
    print("\n".join(f"{m} {' '.join(a)}: {msg}" for m, a, msg in cases))
    assert not failures, "\n".join(failures)
    assert {str(p): sorted(os.listdir(p)) for p in (bad_files["run"],)} == before
    assert not (bad_files["cifar_evil"].parent / "pwned").exists()          # the pickle's payload never ran


def parsers(monkeypatch):
    """{method: the argparse parser its parse_config builds} (caught on its way into common.parse)."""
    class Caught(Exception):
        pass

    def catch(parser, argv, resolve):
        raise Caught(parser)
    monkeypatch.setattr(common, "parse", catch)
    found = {}
    for name, module in (("direct", direct), ("scm", scm), ("gcm", gcm), ("decm", decm)):
        with pytest.raises(Caught) as caught:
            module.parse_config([])
        found[name] = caught.value.args[0]
    monkeypatch.undo()
    return found


def test_every_number_flag_has_its_domain_checked(tmp_path, monkeypatch, capsys):
    """The class of problem behind the table above, for every flag of every method that takes a number: nan,
    inf (where infinity means nothing) and -1 for the integers are one line naming the flag, exit 2, nothing
    left behind."""
    cases = []
    for method, parser in parsers(monkeypatch).items():
        for action in parser._actions:
            if action.type not in (float, common.float_or_inf, int) or (method != "direct" and action.dest in
                                                                           common.COMMON_DEFAULTS):
                continue                                      # the shared flags once, with direct.py
            values = {float: ["nan", "inf"], common.float_or_inf: ["nan"], int: ["-1"]}[action.type]
            for v in values:
                extra = ["0.5"] * (action.nargs - 1 if isinstance(action.nargs, int) else 0)
                cases.append((method, action, [action.option_strings[0], v, *extra]))
    assert len(cases) > 100
    failures = []
    for i, (method, action, argv) in enumerate(cases):
        out = tmp_path / f"out-{i}"
        code, err = run_cli(MAINS[method], ["--dataset", "moons", *argv, "--out", str(out)], capsys)
        names = (action.option_strings[0], action.dest, action.option_strings[0].lstrip("-"))
        if not (code == 2 and len(err) == 1 and err[0].startswith("error: ") and any(n in err[0] for n in names)
                and not out.exists()):
            failures.append(f"{method} {' '.join(argv)} -> exit {code}, {err[-3:]}, out left: {out.exists()}")
    assert not failures, "\n".join(failures)


def test_restricted_unpickler_refuses_code(tmp_path):
    """A CIFAR-10 batch whose pickle calls a function (os.system here) is refused before the call runs."""
    marker = tmp_path / "ran"

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": System()}, 2))
    with pytest.raises(common.UserError, match="posix.system is not allowed|os.system is not allowed"):
        common.read_cifar_batch(str(path))
    assert not marker.exists()
    with open(path, "rb") as f:                                   # (plain pickle would have run it)
        assert pickle.load(f)[b"x"] == 0 and marker.exists()


def test_latent_nan_is_one_line(tmp_path):
    folder = tmp_path / "lat"
    make_latents(folder)
    meta = json.load(open(folder / "meta.json"))
    lat = torch.zeros(5, 4, 8, 8, dtype=torch.float16)
    lat[3, 0, 0, 0] = float("nan")
    torch.save({"latents": lat, "labels": torch.zeros(5, dtype=torch.int64)}, folder / meta["shards"][0]["file"])
    data = common.load_dataset("imagenet-latents", str(folder))
    with pytest.raises(common.UserError, match="latent 3 holds NaN"):
        data.get(torch.arange(5))


# ----------------------------------------------------------------------------------------------
# The non-finite guard

def test_lr_1e30_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    direct.main(TOY + ["--steps", "20", "--ckpt-every", "20", "--out", str(out)])
    good = (out / "ckpt.pt").read_bytes()
    code, err = run_cli(direct.main, TOY + ["--steps", "200", "--ckpt-every", "5", "--max-skips", "8", "--lr", "1e30",
                                            "--out", str(out), "--resume"], capsys)
    print(err)
    assert code == 1 and len(err) == 1
    assert f"the last good checkpoint is {out / 'ckpt.pt'} (step 20)" in err[0]
    assert (out / "ckpt.pt").read_bytes() == good
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert records[-1]["skipped"] >= 1


# ----------------------------------------------------------------------------------------------
# Stop signals, exact resume

def start_run(args, env=None):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cpu_env(**(env or {})))


def wait_for_log(path, proc, timeout=120):
    t0 = time.time()
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


SIGNAL_RUN = ["direct.py", "--dataset", "moons", "--steps", "400", "--log-every", "5", "--ckpt-every", "1000",
              "--eval-samples", "64", "--batch-size", "64"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sig") / "full"
    res = subprocess.run([sys.executable, *SIGNAL_RUN, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         env=cpu_env())
    assert res.returncode == 0, res.stderr[-2000:]
    return load_state(out / "ckpt.pt")


def without_cfg(state):
    return {k: v for k, v in state.items() if k != "cfg"}


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_checkpoints_and_resumes_bit_identically(name, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_run(SIGNAL_RUN + ["--out", str(out)])
    wait_for_log(out / "log.jsonl", proc)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if "Warning" not in line and "warn" not in line]
    sig = getattr(signal, name)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert lines[-1].startswith(f"stopped: {name} after step ") and "continue with --resume" in lines[-1], lines
    assert "Traceback" not in err
    step = int(lines[-1].split("after step ")[1].split(":")[0])
    assert 0 < step < 400 and load_state(out / "ckpt.pt")["step"] == step
    res = subprocess.run([sys.executable, *SIGNAL_RUN, "--out", str(out), "--resume"], cwd=ROOT,
                         capture_output=True, text=True, env=cpu_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert_states_equal(without_cfg(load_state(out / "ckpt.pt")), without_cfg(uninterrupted))
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 400                  # each step logged once


def test_a_moved_run_resumes_bit_identically(uninterrupted, tmp_path):
    """A run stopped by a signal, then moved (another cluster, a renamed experiment), continues from its new
    path with --resume --out NEW exactly as the uninterrupted run; config.json records the new path."""
    old, new = tmp_path / "old", tmp_path / "elsewhere" / "renamed"
    proc = start_run(SIGNAL_RUN + ["--out", str(old)])
    wait_for_log(old / "log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    new.parent.mkdir()
    os.rename(old, new)
    res = subprocess.run([sys.executable, *SIGNAL_RUN, "--out", str(new), "--resume"], cwd=ROOT,
                         capture_output=True, text=True, env=cpu_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"--resume: out {old} -> {new}" in res.stdout
    assert_states_equal(without_cfg(load_state(new / "ckpt.pt")), without_cfg(uninterrupted))
    assert json.load(open(new / "config.json"))["out"] == str(new) and not old.exists()


def ranks_output(proc):
    """What the ranks printed: the end of stdout, and stderr up to torchrun's own failure report (which starts
    when the agent signals or reaps a rank; its long traceback would otherwise hide where a rank died)."""
    lines = proc.stderr.splitlines()
    report = next((i for i, line in enumerate(lines)
                   if re.match(r"[WE]\d{4} .*(closing signal|failed \(exitcode)", line)), len(lines))
    return f"stdout: ...{proc.stdout[-1000:]}\nstderr: ...{chr(10).join(lines[:report])[-2000:]}"


def test_sigterm_under_torchrun(tmp_path):
    """Two gloo processes: SIGTERM to torchrun (forwarded to both ranks) stops both after the same step with
    one whole checkpoint; the resumed run ends bit-identical to an uninterrupted two-process run."""
    def launch(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", *SIGNAL_RUN, "--device", "cpu",
                "--out", str(out), *extra]
    env = cpu_env()
    full = subprocess.run(launch(tmp_path / "full"), cwd=ROOT, capture_output=True, text=True, env=env)
    assert full.returncode == 0, ranks_output(full)
    out = tmp_path / "run"
    proc = subprocess.Popen(launch(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_log(out / "log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "stopped: SIGTERM after step" in err, err[-3000:]
    step = load_state(out / "ckpt.pt")["step"]
    assert 0 < step < 400
    res = subprocess.run(launch(out, "--resume"), cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0, ranks_output(res)
    full = load_state(tmp_path / "full" / "ckpt.pt")
    assert_states_equal(without_cfg(load_state(out / "ckpt.pt")), without_cfg(full))


def test_one_live_process_per_run_folder(tmp_path, capsys):
    """A job scheduled twice: while the first process lives, a second one on its folder (a real process; two
    ranks under torchrun; with or without --resume; --sample-only writing there) is refused in one line naming
    the holder's pid and host, and writes nothing. --sample-only that writes elsewhere is not refused. Once the
    first has died (kill -9: the kernel drops its lock), --resume takes over."""
    out = tmp_path / "run"
    run = ["direct.py", "--dataset", "moons", "--steps", "1000000", "--ckpt-every", "20", "--log-every", "20",
           "--batch-size", "64", "--out", str(out)]
    holder = start_run(run)
    try:
        t0 = time.time()
        while not (out / "ckpt.pt").exists():
            assert holder.poll() is None and time.time() - t0 < 120, holder.communicate()
            time.sleep(0.05)
        who = f"in use by pid {holder.pid} on host {socket.gethostname()}"
        second = subprocess.run([sys.executable, *run, "--resume"], cwd=ROOT, capture_output=True, text=True,
                                env=cpu_env())
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1 and who in err[0], second.stderr[-2000:]
        ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                                "--master_addr=127.0.0.1", f"--master_port={free_port()}", *run, "--resume",
                                "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                               env=cpu_env())
        refusals = [line for line in ranks.stderr.splitlines() if line.startswith("error: ")]
        assert ranks.returncode != 0 and len(refusals) == 1 and who in refusals[0], ranks_output(ranks)
        for argv in (run[1:], ["--sample-only", "--ckpt", str(out / "ckpt.pt")]):
            code, err = run_cli(direct.main, argv, capsys)
            assert code == 2 and len(err) == 1 and who in err[0], err
        assert "--sample-only can write elsewhere with --out" in err[0]
        direct.main(["--sample-only", "--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "s"), "--n", "8",
                     "--eval-samples", "8"])
        assert (tmp_path / "s" / "eval.json").exists() and holder.poll() is None
    finally:
        holder.kill()
        holder.communicate()
    assert f"pid {holder.pid} on host" in (out / ".lock").read_text()        # what the dead holder left
    step = load_state(out / "ckpt.pt")["step"]
    direct.main(run[1:] + ["--resume", "--steps", str(step + 5), "--eval-samples", "16"])
    assert load_state(out / "ckpt.pt")["step"] == step + 5 and (out / ".lock").read_text() == ""


# ----------------------------------------------------------------------------------------------
# Folders: temporary files, log.jsonl, --resume's config check

def test_start_cleans_temporaries_and_cuts_the_log(tmp_path):
    out = tmp_path / "run"
    direct.main(TOY + ["--steps", "20", "--ckpt-every", "10", "--out", str(out)])
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == [10, 20]
    # a killed process left temporary files; the run went on past its checkpoint before dying
    dead = 2 ** 22 + 12345                                      # a pid no process has here
    for name in (f".ckpt.pt.tmp{dead}", f"samples/nfe1.npz.tmp{dead}.npz"):
        (out / name).write_bytes(b"partial")
    common.save_checkpoint(str(out / "ckpt.pt"), {**load_state(out / "ckpt.pt"), "step": 10})   # as if stopped at 10
    direct.main(TOY + ["--steps", "30", "--ckpt-every", "10", "--out", str(out), "--resume"])
    assert not (out / f".ckpt.pt.tmp{dead}").exists() and not (out / "samples" / f"nfe1.npz.tmp{dead}.npz").exists()
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [10, 20, 30]


def test_torn_records_never_block_resume(tmp_path, capsys):
    """A process killed in the middle of an append leaves a torn last line in log.jsonl, a node that loses
    power NUL bytes or garbage: --resume cuts the log back to the checkpoint's step, drops every line that is
    not a whole record and says what it dropped in one line. A torn eval.json is written anew."""
    out = tmp_path / "run"
    args = TOY + ["--ckpt-every", "10", "--out", str(out)]
    direct.main(args + ["--steps", "10"])
    tails = [(b'{"step": 15, "kimg": 1.2, "lo', "1 unreadable line"),
             (b"\x00" * 200, "1 unreadable line"),
             (b'\xff\xfe garbage\n[1, 2]\n{"step": "x"}\n{"step": 99, "loss": 1.0}\n\x00\x00',
              "1 record(s) past step 30 and 4 unreadable line")]
    for i, (tail, dropped) in enumerate(tails):
        with open(out / "log.jsonl", "ab") as f:
            f.write(tail)
        (out / "eval.json").write_bytes(b'{"swd": {"1": 0.0')
        capsys.readouterr()
        direct.main(args + ["--steps", str(20 + 10 * i), "--resume"])
        printed = [line for line in capsys.readouterr().out.splitlines() if "log.jsonl" in line]
        assert len(printed) == 1 and f"up to step {10 + 10 * i}; dropped {dropped}" in printed[0], printed
        assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(10, 21 + 10 * i, 10))
        assert set(json.load(open(out / "eval.json"))["swd"]) == {"1"}


def test_moved_runs_read_their_own_files_from_the_new_path(tmp_path):
    """decm.py's two-stage run keeps its teacher in OUT/teacher and records that path: a copy of the run
    continues from its own teacher, exactly as the original continues in place. A resumed sCM run does not
    read its --init file again (its checkpoint holds the weights), so that file may move or go."""
    first = tmp_path / "first"
    decm.main(["--dataset", "moons", "--teacher-steps", "4", "--steps", "4", "--batch-size", "32",
               "--eval-samples", "16", "--nfe", "1", "--out", str(first)])
    copy, hidden = tmp_path / "copy", tmp_path / "hidden"
    shutil.copytree(first, copy)
    first.rename(hidden)                          # the original is out of reach while the copy resumes
    resume = ["--dataset", "moons", "--teacher-steps", "4", "--steps", "8", "--batch-size", "32",
              "--eval-samples", "16", "--nfe", "1", "--resume"]
    decm.main(resume + ["--out", str(copy)])
    assert json.load(open(copy / "config.json"))["teacher"] == str(copy / "teacher" / "ckpt.pt")
    hidden.rename(first)
    decm.main(resume + ["--out", str(first)])
    assert_states_equal(without_cfg(load_state(copy / "ckpt.pt")), without_cfg(load_state(first / "ckpt.pt")))
    # sCM: a student started from --init resumes after the init file is gone
    teacher, student = tmp_path / "t", tmp_path / "s"
    small = ["--dataset", "moons", "--batch-size", "32", "--eval-samples", "16", "--nfe", "1"]
    scm.main(small + ["--mode", "diffusion", "--steps", "2", "--out", str(teacher)])
    scm.main(small + ["--init", str(teacher / "ckpt.pt"), "--steps", "2", "--out", str(student)])
    shutil.rmtree(teacher)
    scm.main(small + ["--init", str(teacher / "ckpt.pt"), "--steps", "4", "--out", str(student), "--resume"])
    assert load_state(student / "ckpt.pt")["step"] == 4


def test_a_teacher_given_by_a_relative_path_is_found_from_anywhere(tmp_path, monkeypatch, capsys):
    """--teacher is saved as an absolute path, so --resume from another working folder finds it; a teacher the
    user moved is taken at its new path, a different teacher is refused."""
    small = ["--dataset", "moons", "--batch-size", "32", "--eval-samples", "16", "--nfe", "1"]
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    decm.main(small + ["--losses", "fm", "--steps", "2", "--out", "fm"])
    decm.main(small + ["--teacher", "fm/ckpt.pt", "--steps", "2", "--out", "student"])
    assert json.load(open("student/config.json"))["teacher"] == str(tmp_path / "work" / "fm" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    student = str(tmp_path / "work" / "student")
    decm.main(small + ["--steps", "3", "--out", student, "--resume"])
    (tmp_path / "work" / "fm").rename(tmp_path / "moved")
    decm.main(small + ["--teacher", "moved/ckpt.pt", "--steps", "4", "--out", student, "--resume"])
    assert load_state(tmp_path / "work" / "student" / "ckpt.pt")["step"] == 4
    decm.main(small + ["--losses", "fm", "--steps", "2", "--out", "other"])
    code, err = run_cli(decm.main, small + ["--teacher", "other/ckpt.pt", "--steps", "5", "--out", student,
                                            "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "started with other settings (--teacher" in err[0]


def test_resume_applies_a_new_lr_and_logs_it(tmp_path, capsys):
    out = tmp_path / "run"
    direct.main(TOY + ["--steps", "10", "--out", str(out)])
    capsys.readouterr()
    direct.main(TOY + ["--steps", "20", "--out", str(out), "--resume", "--lr", "5e-4"])
    printed = capsys.readouterr().out
    assert "--resume: lr 0.001 -> 0.0005" in printed
    assert json.loads(open(out / "log.jsonl").read().splitlines()[-1])["lr"] == 5e-4
    assert load_state(out / "ckpt.pt")["opt"]["param_groups"][0]["lr"] == 5e-4


# What a full disk raises: Python's file writes an OSError; torch.save's zip writer, where the disk fills between
# its own writes, a RuntimeError (the message a real full disk gave, issue 28).
FULL_DISK = {"OSError": OSError(28, "No space left on device"),
             "RuntimeError": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374")}


@pytest.mark.parametrize("raised", FULL_DISK)
def test_full_disk_keeps_the_previous_checkpoint(raised, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    direct.main(TOY + ["--steps", "10", "--out", str(out)])
    good = (out / "ckpt.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and "rng" in obj:
            f.write(b"partial")
            raise FULL_DISK[raised]
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_cli(direct.main, TOY + ["--steps", "20", "--out", str(out), "--resume"], capsys)
    assert code == 1 and len(err) == 1 and "is kept" in err[0], err
    assert ("No space left on device" if raised == "OSError" else "the write failed") in err[0], err
    assert (out / "ckpt.pt").read_bytes() == good
    assert [f for f in os.listdir(out) if ".tmp" in f] == []


def test_a_start_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """No room even for the run lock's line: one line naming the lock and the cause, exit 2, and the run
    folder this start would have made is gone again."""
    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            raise OSError(28, "No space left on device")
    real_open = open

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if str(path).endswith(".lock") and "a" in mode else f
    monkeypatch.setattr(common, "open", opener, raising=False)
    out = tmp_path / "deep" / "run"
    code, err = run_cli(direct.main, TOY + ["--steps", "5", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "cannot write the lock" in err[0] and "No space left" in err[0], err
    assert not (tmp_path / "deep").exists()


def test_fid_ref_makes_its_folder_and_a_full_disk_leaves_nothing(bad_files, tmp_path, monkeypatch, capsys):
    """`common.py fid-ref IMAGES --out DIR/NEW/stats.npz` makes the folders it needs; when the write fails (a full
    disk) it is one line, and neither the temporary file nor the folders it made are left."""
    argv = ["fid-ref", str(bad_files["npz2"]), "--fid-weights", str(bad_files["fid_weights"]), "--out"]
    good = tmp_path / "new" / "deeper" / "stats.npz"
    assert run_cli(common._main, argv + [str(good)], capsys)[0] == 0
    mu, sigma = common.read_stats(str(good))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)

    def full_disk(f, **arrays):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", full_disk)
    code, err = run_cli(common._main, argv + [str(tmp_path / "other" / "deeper" / "stats.npz")], capsys)
    err = [line for line in err if "Inception features" not in line]       # the progress bar shares stderr
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["new"]


@pytest.mark.parametrize("env, missing", [({"RANK": "1"}, "WORLD_SIZE and MASTER_ADDR and MASTER_PORT are not"),
                                          ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not"),
                                          ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                                            "MASTER_PORT": "1"}, "not whole numbers")])
def test_a_half_set_torchrun_environment_is_one_line_from_that_rank(env, missing, tmp_path, monkeypatch, capsys):
    """RANK without the rest of torchrun's environment: before any process group exists a rank fails alone, so
    it says why itself, naming itself; nothing is written."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    code, err = run_cli(direct.main, TOY + ["--steps", "5", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"rank {env['RANK']}: error: ") and missing in err[0], err
    assert not out.exists()


def test_compile_without_a_compiler_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """--compile where Inductor finds no working C++ compiler: one line naming the cause and the way out, exit 2,
    and no run folder."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    out = tmp_path / "run"
    code, err = run_cli(gcm.main, TOY + ["--steps", "5", "--compile", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "No working C++ compiler" in err[0] and "without --compile" in err[0], err
    assert not out.exists()
