"""The GPU path, wherever PyTorch sees a CUDA GPU; skipped, with the reason, elsewhere. With
tests/test_accumulation.py's and tests/test_precision.py's cuda cases (--batch-gpu accumulation, and the
precision oracles under CUDA bf16 with TF32 on) this is the CUDA part of the suite:

- every method trains a few steps on CUDA and its resumption (--deterministic) ends bit-identical to the run
  without a stop;
- a one-process torchrun with NCCL checkpoints on SIGTERM and resumes to the same end;
- --sample-only --npz on CUDA gives the CPU's samples up to the rounding of a few pixels, and `common.py fid`
  on CUDA gives the CPU's FID (the Inception runs in IEEE fp32 on both)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import decm
import direct
import gcm
import scm
from conftest import ROOT, assert_states_equal, free_port, load_state
from test_contract import wait_for_log, without_cfg
from test_fid import random_inception

pytestmark = pytest.mark.cuda

TOY = ["--dataset", "moons", "--device", "cuda", "--deterministic", "--eval-samples", "64", "--log-every", "10",
       "--ckpt-every", "1000"]
RUNS = {"direct": (direct.main, []), "gcm": (gcm.main, ["--variant", "vu"]), "scm": (scm.main, ["--mode", "sct"]),
        "decm": (decm.main, ["--teacher-steps", "0"])}


@pytest.fixture
def deterministic():
    """--deterministic turns PyTorch's deterministic mode on for the process; turn it off after the test."""
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("method", RUNS)
def test_training_on_cuda_resumes_bit_identically(method, tmp_path, deterministic):
    main, flags = RUNS[method]
    main(TOY + flags + ["--steps", "30", "--out", str(tmp_path / "full")])
    main(TOY + flags + ["--steps", "15", "--out", str(tmp_path / "part")])
    main(TOY + flags + ["--steps", "30", "--out", str(tmp_path / "part"), "--resume"])
    full, part = load_state(tmp_path / "full" / "ckpt.pt"), load_state(tmp_path / "part" / "ckpt.pt")
    assert full["step"] == 30 and "cuda" in full["rng"][0]                     # the CUDA RNG is checkpointed
    assert_states_equal(without_cfg(part), without_cfg(full))
    ev = json.load(open(tmp_path / "full" / "eval.json"))
    assert all(np.isfinite(v) for scores in ev.values() for v in scores.values())


def test_torchrun_nccl_stops_on_sigterm_and_resumes(tmp_path):
    """torchrun with one process on the GPU (NCCL): SIGTERM writes the checkpoint and exits with 143; --resume
    ends bit-identical (--deterministic) to the same launch without the stop."""
    run = ["direct.py", "--dataset", "moons", "--steps", "300", "--log-every", "5", "--ckpt-every", "1000",
           "--eval-samples", "64", "--device", "cuda", "--deterministic"]

    def launch(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", *run, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    full = subprocess.run(launch(tmp_path / "full"), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    assert f"1 x {torch.cuda.get_device_name()} (nccl)" in full.stdout.splitlines()[0], full.stdout[:500]
    out = tmp_path / "run"
    proc = subprocess.Popen(launch(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_log(out / "log.jsonl", proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped: SIGTERM after step" in err, err[-3000:]
    step = load_state(out / "ckpt.pt")["step"]
    assert 0 < step < 300
    res = subprocess.run(launch(out, "--resume"), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_states_equal(without_cfg(load_state(out / "ckpt.pt")), without_cfg(load_state(tmp_path / "full" / "ckpt.pt")))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A few steps of a class-conditional sCM teacher on digits, on the GPU (the files matter here)."""
    out = tmp_path_factory.mktemp("cuda") / "digits"
    data = tmp_path_factory.mktemp("cuda-data")
    scm.main(["--dataset", "digits", "--data-path", str(data), "--mode", "diffusion", "--class-cond",
              "--class-dropout", "0.1", "--steps", "20", "--batch-size", "16", "--nfe", "2", "--eval-samples", "0",
              "--device", "cuda", "--out", str(out)])
    return out, str(data)


def test_npz_export_and_fid_on_cuda(digits_run, tmp_path, capsys):
    """The same seed exports the same samples on the GPU twice; they match the CPU's export up to rounding (the
    labels exactly); and `common.py fid` on the GPU gives the CPU's FID to 1e-3 (relative)."""
    run, data = digits_run

    def export(name, device):
        scm.main(["--sample-only", "--ckpt", str(run / "ckpt.pt"), "--n", "64", "--nfe", "2", "--npz",
                  str(tmp_path / f"{name}.npz"), "--eval-samples", "0", "--device", device,
                  "--out", str(tmp_path / name), "--data-path", data])
        with np.load(tmp_path / f"{name}.npz") as f:
            return f["arr_0"], f["labels"]
    (a, la), (b, lb), (c, lc) = export("gpu1", "cuda"), export("gpu2", "cuda"), export("cpu", "cpu")
    assert a.dtype == np.uint8 and a.shape == (64, 8, 8, 1)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and np.array_equal(la, lc)
    diff = np.abs(a.astype(int) - c.astype(int))
    print(f"GPU vs CPU export: {np.mean(diff > 0):.4f} of pixels differ, largest difference {diff.max()} levels")
    assert np.mean(diff > 1) < 0.01
    weights = tmp_path / "inception.pth"
    torch.save(random_inception(2).net.state_dict(), weights)
    ref = tmp_path / "ref.npz"
    mu, sigma = common.stats_of(str(tmp_path / "cpu.npz"), str(weights), device="cpu")
    np.savez(ref, mu=mu, sigma=sigma)
    common._main(["fid", str(tmp_path / "gpu1.npz"), "--ref", str(ref), "--fid-weights", str(weights)])
    on_gpu = float(capsys.readouterr().out.strip().split(": ")[-1])
    mu_c, sigma_c = common.stats_of(str(tmp_path / "gpu1.npz"), str(weights), device="cpu")
    on_cpu = common.frechet_distance(mu_c, sigma_c, mu, sigma)
    print(f"FID of the GPU export against the CPU's: {on_gpu:.6f} on the GPU, {on_cpu:.6f} on the CPU")
    assert on_gpu == pytest.approx(on_cpu, rel=1e-3, abs=1e-4)
