import os
import pickle
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cuBLAS reads its workspace setting at a process's first cuBLAS call, and --deterministic (tests/test_cuda.py)
# needs a fixed one: set it before any test of this worker touches a GPU (common.deterministic_algorithms can
# only set it for processes that have not).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# pytest.ini runs the suite on two workers (pytest-xdist), a module per worker at a time. Each worker and what it
# starts (CLI subprocesses, notebook kernels) then keeps to one thread: two workers of two threads would
# oversubscribe the two cores CI has, and a small network gains little from a second thread anyway.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# The suite is about CPU behaviour (bit-identical resumes, quality thresholds measured on CPUs), on a machine with a
# GPU as on one without: in this process PyTorch is made to see no GPU, so every run picks the CPU, and every
# process a test starts gets CUDA_VISIBLE_DEVICES="" (cpu_env). The GPU has its own tests, tests/test_cuda.py
# (marked `cuda`), which undo this for themselves and are skipped, with the reason, where there is no GPU.
HAS_CUDA = torch.cuda.is_available()


_cuda_is_available = torch.cuda.is_available


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (skipped where there is none)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU; PyTorch sees none here")


@pytest.fixture(scope="session", autouse=True)
def cpu_unless_marked_cuda():
    patch = pytest.MonkeyPatch()
    patch.setattr(torch.cuda, "is_available", lambda: False)
    yield
    patch.undo()


class CpuOnlyPopen(subprocess.Popen):
    """subprocess.Popen for the CPU tests: a run of the project's scripts that they start must see no GPU
    (env=cpu_env()), as if a GPU were visible on every machine, so a test that forgets it fails here on a
    CPU-only machine too, not only where a GPU would take the run over (and a bit-for-bit comparison with a CPU
    run would fail). Other programs (a compiler, Inductor's workers) are left alone."""
    RUNS = re.compile(r"\b(scm|gcm|decm|direct|common|benchmark|ddp_step)\.py\b|gpu_check\.sh|torch\.distributed\.run")

    def __init__(self, args, *rest, env=None, **kwargs):
        command = args if isinstance(args, str) else " ".join(map(str, args))
        if self.RUNS.search(command) and (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES") != "":
            raise AssertionError(f"a CPU test starts {args!r} where a GPU would be visible: give it env=cpu_env()")
        super().__init__(args, *rest, env=env, **kwargs)


@pytest.fixture(autouse=True)
def gpu_for_cuda_tests(request, monkeypatch):
    """A test marked cuda sees the GPU again, for its own duration; any other test starts only CPU processes."""
    if request.node.get_closest_marker("cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", _cuda_is_available)
    else:
        monkeypatch.setattr(subprocess, "Popen", CpuOnlyPopen)


def cpu_env(**extra):
    """The environment for a process a CPU test starts: no GPU visible, one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": "", **extra}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, timeout=600):
    """Run `script` under torchrun with `nproc` CPU processes (gloo); returns the CompletedProcess. The `--`
    keeps torchrun's own parser off the script's flags (it would read --n as an abbreviation of its --nnodes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_addr=127.0.0.1", f"--master_port={free_port()}", "--", script, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_torchrun():
    return torchrun


def write_cifar_fixture(root, per_batch=6, seed=0):
    """A tiny CIFAR-10 in the release's format: cifar-10-batches-py/data_batch_{1..5}, test_batch and
    batches.meta, each a pickled dict with b"data" uint8 [n, 3072] (R, G, B planes) and b"labels"."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        if name != "test_batch":
            all_data.append(data)
            all_labels += labels
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return np.concatenate(all_data), all_labels


@pytest.fixture
def cifar_root(tmp_path):
    """A tiny CIFAR-10 (30 training images) in the release's on-disk format."""
    root = tmp_path / "data"
    write_cifar_fixture(str(root))
    return str(root)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_states_equal(a, b, path=""):
    """Recursively compare two checkpoint states for exact (bitwise) equality."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path} keys differ"
        for k in a:
            assert_states_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path} lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def check_ddp_step(run_torchrun, tmp_path, method, variants=("default",)):
    """Run tests/ddp_step.py for one method and its variants (one torchrun launch) and assert the
    data-parallel SGD identity for each."""
    import json
    res = run_torchrun("tests/ddp_step.py", method, ",".join(variants), str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    for variant in variants:
        r0, r1 = (json.load(open(tmp_path / f"ddp_{method}_{variant}_rank{r}.json")) for r in range(2))
        for r in (r0, r1):
            assert r["equal_across_ranks"], (variant, r)
            assert r["max_dev_from_mean_grad"] < 1e-6 + 1e-5 * r["step_size"], (variant, r)
            assert all(m > 0 for m in r["moved_per_net"]), (variant, r)      # every trained network moved
        assert r0["loss_differs_across_ranks"], variant                       # ranks had different batches
        for r in (r0, r1):                                                    # --batch-gpu: the same update
            assert r["accumulation_max_dev"] < 1e-6 + 1e-5 * r["accumulation_step"], (variant, r)


def run_cli(main, argv, capsys):
    """Call a method's main through common.cli in-process; returns (exit code, stderr lines)."""
    import common
    try:
        common.cli(main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """A data folder holding the digits classifier, trained once for the whole session (about 15 s)."""
    import common
    path = tmp_path_factory.mktemp("digits-data")
    common.digits_classifier(str(path))
    return str(path)
