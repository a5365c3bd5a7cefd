"""scm.py: the sCM tangent against the exact Gaussian consistency function (sCD exactly, sCT in
expectation), the JVP rearrangement against Eq. (6) and finite differences, the discrete-time tangent's
convergence, the samplers on the exact solution, toy sCT and sCD runs, one DiT step, bit-identical
resume, a two-process DDP step and one-line errors."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

import common
import dit
import scm
from conftest import ROOT, assert_states_equal, check_ddp_step, cpu_env, load_state, run_cli

SIGMA_D = 0.5
MU, STD = torch.tensor([0.8, -0.3, 0.2]), 0.3
FLOW = common.GaussianFlow(common.TrigFlow(SIGMA_D), MU, STD)        # data N(MU, STD^2 I) in TrigFlow
bc = common.bcast


def exact_F(u, t, y=None, w=None):
    """The network that makes Eq. (5) the exact consistency function f*(x_t, t) = flow_map(x_t, t, 0):
    F* = (cos t x_t - f*) / (sigma_d sin t) at x_t = sigma_d u."""
    x = SIGMA_D * u
    f = FLOW.flow_map(x, t, torch.zeros_like(t))
    return (bc(torch.cos(t), x) * x - f) / (SIGMA_D * bc(torch.sin(t), x))


def exact_teacher(u, t, y=None, w=None):
    """The exact diffusion model: sigma_d F_pretrain = the PF-ODE velocity (Eq. 3)."""
    return FLOW.velocity(SIGMA_D * u, t) / SIGMA_D


def marginal_points(n, seed, t_lo=0.05, t_hi=1.5):
    g = torch.Generator().manual_seed(seed)
    t = t_lo + (t_hi - t_lo) * torch.rand(n, generator=g, dtype=torch.float64)
    x0 = FLOW.sample_data(n, g).double()
    z = SIGMA_D * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return common.TrigFlow(SIGMA_D)(x0, z, t)[0], t, g


def random_net(seed=0, **kw):
    torch.manual_seed(seed)
    net = dit.build_model("MLP", (3,), hidden_size=32, depth=2, time_scale=1.0, **kw).double()
    torch.nn.init.normal_(net.out.weight, std=0.3)                     # leave the zero-initialised output
    return net


# ---------------------------------------------------------------------------------------------
# The maths

def test_scd_tangent_vanishes_at_the_exact_solution():
    """sCD with the exact teacher: the exact consistency function is constant along the PF-ODE, so
    g = cos t df/dt = 0 and F_theta - F_minus - g vanishes (before normalisation) at F_theta = F*."""
    x_t, t, _ = marginal_points(512, 0)
    dxdt = scm.teacher_velocity(exact_teacher, x_t, t, SIGMA_D)
    F_minus, g = scm.tangent(exact_F, x_t, t, dxdt, SIGMA_D)
    assert torch.allclose(F_minus, exact_F(x_t / SIGMA_D, t))
    residual = exact_F(x_t / SIGMA_D, t) - F_minus - g
    assert residual.abs().max() < 1e-10 and g.abs().max() < 1e-10
    # the check can fail: the consistency function of a different data law is not consistent here
    wrong = common.GaussianFlow(common.TrigFlow(SIGMA_D), MU, 1.2 * STD)
    F_wrong = lambda u, s: (bc(torch.cos(s), u) * SIGMA_D * u - wrong.flow_map(SIGMA_D * u, s, 0 * s)) / (
        SIGMA_D * bc(torch.sin(s), u))
    assert scm.tangent(F_wrong, x_t, t, dxdt, SIGMA_D)[1].abs().max() > 1e-2


def posterior_pairs(x_t, t, k, g):
    """k draws (x0, z) ~ p(x0, z | x_t) for one point x_t (Gaussian data: a Gaussian posterior)."""
    c, s = math.cos(t), math.sin(t)
    var = 1 / (1 / STD ** 2 + c ** 2 / (s ** 2 * SIGMA_D ** 2))
    mean = var * (MU.double() / STD ** 2 + c * x_t / (s ** 2 * SIGMA_D ** 2))
    x0 = mean + math.sqrt(var) * torch.randn(k, 3, generator=g, dtype=torch.float64)
    return x0, (x_t - c * x0) / s


@pytest.mark.parametrize("t_val", [0.3, 0.9, 1.4])
def test_sct_tangent_vanishes_in_expectation(t_val):
    """sCT replaces dx_t/dt by v_t = cos t z - sin t x0. g is affine in dx_t/dt and E[v_t | x_t] is the
    PF-ODE velocity, so at the exact F* the sCT tangent averages to zero over p(x0, z | x_t)."""
    g_rng = torch.Generator().manual_seed(1)
    x_t = FLOW.flow_map(FLOW.sample_data(4, g_rng).double(), torch.zeros(4, dtype=torch.float64),
                        torch.full((4,), t_val, dtype=torch.float64))           # 4 points of the marginal
    k = 20_000
    for i in range(4):
        x0, z = posterior_pairs(x_t[i], t_val, k, g_rng)
        xt = x_t[i].expand(k, 3)
        t = torch.full((k,), t_val, dtype=torch.float64)
        assert torch.allclose(common.TrigFlow(SIGMA_D)(x0, z, t)[0], xt)
        v_t = math.cos(t_val) * z - math.sin(t_val) * x0
        g = scm.tangent(exact_F, xt, t, v_t, SIGMA_D)[1]
        se = g.std(0) / math.sqrt(k)
        assert (g.mean(0).abs() < 5 * se).all(), (g.mean(0), se)
        assert g.std(0).max() > 1e-2                                    # per sample it is not zero
        # a wrong F (off by 30%) leaves a bias many standard errors wide
        g_bad = scm.tangent(lambda u, s: 1.3 * exact_F(u, s), xt, t, v_t, SIGMA_D)[1]
        assert (g_bad.mean(0).abs() > 10 * g_bad.std(0) / math.sqrt(k)).any()


def test_jvp_rearrangement_equals_eq6_and_finite_differences():
    """Section 5.1's JVP (tangent (cos t sin t dxdt, cos t sin t sigma_d) at (x_t/sigma_d, t)) gives the
    same g as cos t times Eq. (6) with dF/dt from the plain JVP in (x_t, t) with tangent (dxdt, 1), and as
    a central difference of f along the trajectory; r scales only the sin t part (tangent warmup)."""
    net = random_net()
    g_rng = torch.Generator().manual_seed(2)
    x_t = torch.randn(64, 3, generator=g_rng, dtype=torch.float64)
    t = 0.05 + 1.45 * torch.rand(64, generator=g_rng, dtype=torch.float64)
    dxdt = torch.randn(64, 3, generator=g_rng, dtype=torch.float64)
    F_minus, g = scm.tangent(net, x_t, t, dxdt, SIGMA_D)
    F, dFdt = common.jvp(lambda x, s: net(x / SIGMA_D, s), (x_t, t), (dxdt, torch.ones_like(t)))
    cos, sin = bc(torch.cos(t), x_t), bc(torch.sin(t), x_t)
    eq6 = -cos * (SIGMA_D * F - dxdt) - sin * (x_t + SIGMA_D * dFdt)                      # Eq. (6)
    assert torch.allclose(F_minus, F) and torch.allclose(g, cos * eq6, atol=1e-12)
    h = 1e-5
    f = lambda x, s: scm.consistency_fn(net, x, s, SIGMA_D)
    fd = (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    assert torch.allclose(eq6, fd, atol=1e-7)
    g0, g_half = (scm.tangent(net, x_t, t, dxdt, SIGMA_D, r)[1] for r in (0.0, 0.5))
    assert torch.allclose(g0, -cos ** 2 * (SIGMA_D * F - dxdt), atol=1e-12)
    assert torch.allclose(g_half, (g0 + g) / 2, atol=1e-12)


def test_cm_boundary_condition_and_eq5():
    net = random_net()
    x = torch.randn(32, 3, dtype=torch.float64)
    assert torch.equal(scm.consistency_fn(net, x, torch.zeros(32, dtype=torch.float64), SIGMA_D), x)
    t = torch.full((32,), 0.7, dtype=torch.float64)
    assert torch.allclose(scm.consistency_fn(exact_F, x, t, SIGMA_D), FLOW.flow_map(x, t, 0 * t))


def test_discrete_tangent_converges_to_the_continuous_one():
    """App. E: Delta = [f(x_t, t) - f(x_t', t')] / sin(t - t') with the teacher's DDIM step; g = cos t Delta
    tends to the JVP tangent at first order in t - t' (halving the step halves the error), and the EDM grid
    gets there as N grows."""
    net, teacher = random_net(0), random_net(1)
    x_t, t, _ = marginal_points(256, 3, 0.1, 1.5)
    dxdt = scm.teacher_velocity(teacher, x_t, t, SIGMA_D)
    g_cont = scm.tangent(net, x_t, t, dxdt, SIGMA_D, r=0.7)[1]

    def g_disc(t_prev):
        F_prev = net(scm.ddim_step(x_t, t, t_prev, dxdt) / SIGMA_D, t_prev)
        return scm.discrete_tangent(net(x_t / SIGMA_D, t), F_prev, x_t, t, t_prev, dxdt, SIGMA_D, r=0.7)
    errs = [(g_disc(t - h) - g_cont).abs().max() for h in (2e-3, 1e-3)]
    assert errs[1] < 1e-2 and 1.8 < errs[0] / errs[1] < 2.2
    # at the exact solution the continuous g is 0, and Delta vanishes at first order in t - t'
    v = scm.teacher_velocity(exact_teacher, x_t, t, SIGMA_D)
    d_exact = [scm.discrete_tangent(exact_F(x_t / SIGMA_D, t), exact_F(scm.ddim_step(x_t, t, t - h, v) / SIGMA_D, t - h),
                                    x_t, t, t - h, v, SIGMA_D).abs().max() for h in (2e-3, 1e-3)]
    assert d_exact[1] < 1e-3 and 1.8 < d_exact[0] / d_exact[1] < 2.2
    # on the EDM grid: pairs (t_{i+1}, t_i) from the discretised proposal, N = 32 -> 512
    cfg = {**scm.DEFAULTS, "sigma_d": SIGMA_D}
    errors = []
    for N in (32, 512):
        torch.manual_seed(4)
        t, t_prev = scm.sample_discrete_times(256, {**cfg, "discrete_steps": N}, "cpu")     # float32, on the grid
        grid = scm.edm_times(N, SIGMA_D).float()
        assert torch.isin(t, grid).all() and torch.isin(t_prev, grid).all() and (t > t_prev).all()
        t, t_prev = t.double(), t_prev.double()
        dx = scm.teacher_velocity(teacher, x_t, t, SIGMA_D)
        F_prev = net(scm.ddim_step(x_t, t, t_prev, dx) / SIGMA_D, t_prev)
        d = scm.discrete_tangent(net(x_t / SIGMA_D, t), F_prev, x_t, t, t_prev, dx, SIGMA_D)
        errors.append((d - scm.tangent(net, x_t, t, dx, SIGMA_D)[1]).abs().median())
    assert errors[1] < errors[0] / 8


def test_tangent_normalisation_and_clipping():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    assert torch.allclose(scm.normalize_tangent(g, "normalize", 0.1), g / torch.tensor([[5.1], [0.6]]))
    rms = torch.tensor([[5 / math.sqrt(2) + 0.1], [0.5 / math.sqrt(2) + 0.1]])
    assert torch.allclose(scm.normalize_tangent(g, "normalize", 0.1, "rms"), g / rms)
    assert torch.equal(scm.normalize_tangent(g, "clip"), torch.tensor([[1.0, 1.0], [0.0, 0.5]]))
    assert torch.equal(scm.normalize_tangent(g, "raw"), g)


def test_log_normal_proposal():
    """Alg. 1 l.2: sigma_d tan t ~ LogNormal(P_mean, P_std^2) (KS test)."""
    cfg = {**scm.DEFAULTS, "P_mean": -0.8, "P_std": 1.6}
    torch.manual_seed(0)
    t = scm.sample_time(20_000, cfg, "cpu").double()
    assert ((t > 0) & (t < math.pi / 2)).all()
    sigma = (cfg["sigma_d"] * torch.tan(t)).numpy()
    assert scipy.stats.kstest(sigma, lambda s: common.LogNormal(-0.8, 1.6).cdf(torch.as_tensor(s)).numpy()).pvalue > 1e-3


def test_adaptive_weight_reaches_the_appendix_d_optimum():
    """min over w of e^w E[err | t] - w is at e^w E[err | t] = 1: w_phi learns the inverse loss scale."""
    torch.manual_seed(0)
    weight = scm.AdaptiveWeight(SIGMA_D)
    opt = torch.optim.Adam(weight.parameters(), lr=0.05)
    scale = lambda t: 0.02 + torch.sin(t) ** 2                            # E[err | t], varies 50x over t
    for _ in range(400):
        t = scm.sample_time(256, scm.DEFAULTS, "cpu")
        err = scale(t) * torch.distributions.Chi2(4.0).sample((256,)) / 4
        w = weight(t)
        loss = (torch.exp(w) * err - w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = torch.tensor([0.1, 0.4, 0.8, 1.2])
    product = torch.exp(weight(t)) * scale(t)
    assert ((product - 1).abs() < 0.15).all(), product


def test_samplers_on_the_exact_solution():
    """1 and 2 consistency steps with F* land on N(MU, STD^2); the teacher's ODE sampler with the exact
    velocity gets there with enough steps."""
    g = torch.Generator().manual_seed(5)
    z = SIGMA_D * torch.randn(40_000, 3, generator=g, dtype=torch.float64)
    cfg = {**scm.DEFAULTS, "sigma_d": SIGMA_D}
    for nfe in (1, 2, 3):
        times = scm.consistency_times(nfe, cfg)
        assert times[0] == pytest.approx(math.atan(80 / SIGMA_D)) and times[1:] == pytest.approx([1.1, 0.55][: nfe - 1])
        x = scm.sample_consistency(exact_F, z, times, SIGMA_D, g)
        assert (x.mean(0) - MU).abs().max() < 0.01 and (x.std(0) - STD).abs().max() < 0.01
    x = scm.sample_ode(exact_teacher, z, 64, SIGMA_D, scm.t_max(cfg))
    assert (x.mean(0) - MU).abs().max() < 0.01 and (x.std(0) - STD).abs().max() < 0.01
    x = scm.sample_ode(exact_teacher, z, 2, SIGMA_D, scm.t_max(cfg))           # and few steps are worse
    assert (x.std(0) - STD).abs().max() > 0.02


# ---------------------------------------------------------------------------------------------
# Training runs

def prior_swd(out):
    data = np.load(out / "samples" / "data.npy")
    noise = torch.randn(len(data), 2, generator=torch.Generator().manual_seed(0))
    return common.sliced_wasserstein(noise, torch.from_numpy(data))


def test_toy_sct_run_beats_the_prior(tmp_path):
    out = tmp_path / "sct"
    scm.main(["--dataset", "checkerboard", "--out", str(out)])
    ev, prior = json.load(open(out / "eval.json")), prior_swd(out)
    print(f"sCT checkerboard SWD 1-step {ev['swd']['1']:.4f}, 2-step {ev['swd']['2']:.4f}, prior {prior:.4f}")
    assert ev["swd"]["1"] < 0.5 * prior and ev["swd"]["2"] < 0.5 * prior
    assert np.load(out / "samples" / "nfe1.npy").shape == (4096, 2)
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert {"mse", "w_phi", "g_rms", "r", "grad_norm"} <= set(log[-1]) and log[-1]["r"] == 1.0
    assert log[0]["r"] < 1.0                                                # the tangent warmup ramps


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    """A TrigFlow diffusion teacher on moons, trained by scm.py itself (Eq. 4)."""
    out = tmp_path_factory.mktemp("teacher")
    scm.main(["--dataset", "moons", "--mode", "diffusion", "--out", str(out)])
    return out


def test_toy_teacher_and_scd_run(toy_teacher, tmp_path):
    teacher_swd = json.load(open(toy_teacher / "eval.json"))["swd"]
    out = tmp_path / "scd"
    scm.main(["--dataset", "moons", "--mode", "scd", "--teacher", str(toy_teacher / "ckpt.pt"), "--out", str(out)])
    ev, prior = json.load(open(out / "eval.json")), prior_swd(out)
    print(f"teacher ODE SWD {teacher_swd}; sCD moons SWD 1-step {ev['swd']['1']:.4f}, "
          f"2-step {ev['swd']['2']:.4f}, prior {prior:.4f}")
    assert max(teacher_swd.values()) < 0.3 * prior
    assert ev["swd"]["1"] < 0.5 * prior and ev["swd"]["2"] < 0.5 * prior
    cfg = json.load(open(out / "config.json"))
    assert cfg["init"] == cfg["teacher"] == str(toy_teacher / "ckpt.pt")     # Alg. 1 l.1 by default
    # --sample-only from the checkpoint reproduces the evaluation
    scm.main(["--sample-only", "--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "s")])
    again = json.load(open(tmp_path / "s" / "eval.json"))
    assert again["swd"]["1"] == pytest.approx(ev["swd"]["1"], abs=1e-9)


@pytest.fixture(scope="module")
def labelled_teacher(tmp_path_factory):
    """A two-step class-conditional teacher with label dropout (for guidance and bad-input checks)."""
    out = tmp_path_factory.mktemp("labelled")
    scm.main(["--dataset", "moons", "--mode", "diffusion", "--class-cond", "--class-dropout", "0.2",
              "--steps", "2", "--eval-samples", "16", "--nfe", "2", "--out", str(out)])
    return out / "ckpt.pt"


def test_guided_student_starts_as_the_teacher(labelled_teacher, tmp_path):
    """Alg. 1 l.1 with guidance: the student has the extra scale input, zero-initialised, so it computes the
    teacher's function; the teacher's CFG velocity is F_u + w (F_c - F_u)."""
    cfg = scm.parse_config(["--dataset", "moons", "--mode", "scd", "--teacher", str(labelled_teacher),
                            "--class-cond", "--cfg-max", "2", "--out", str(tmp_path)])
    data = common.load_dataset("moons")
    student = scm.build_net(cfg, data)
    tcfg, state = scm.load_pretrained(cfg["teacher"], cfg, data, "teacher")
    scm.init_from(student, tcfg, state, cfg)
    teacher = scm.build_net(tcfg, data)
    teacher.load_state_dict(state)
    for m in (student, teacher):
        m.eval()
    x, t, y = torch.randn(8, 2), torch.rand(8), torch.randint(0, 2, (8,))
    w = 1 + torch.rand(8)
    assert torch.allclose(student(x, t, y=y, w=w), teacher(x, t, y=y), atol=1e-6)
    v = scm.teacher_velocity(teacher, x, t, 1.0, y, w)
    F_c, F_u = teacher(x, t, y=y), teacher(x, t, y=torch.full_like(y, 2))
    assert torch.allclose(v, F_u + w[:, None] * (F_c - F_u), atol=1e-6)


@pytest.mark.parametrize("variant", ["sct", "scd-cfg-discrete"])
def test_one_dit_image_step(variant, tmp_path, cifar_root):
    base = ["--dataset", "cifar10", "--data-path", cifar_root,
              "--eval-samples", "8", "--model", "DiT-T/2", "--batch-size", "4", "--n", "4",
            "--log-every", "1"]
    args = base + ["--steps", "2", "--out", str(tmp_path / "img")]
    if variant != "sct":
        scm.main(base + ["--mode", "diffusion", "--class-cond", "--class-dropout", "0.1", "--steps", "1",
                         "--nfe", "2", "--out", str(tmp_path / "teacher")])
        args += ["--mode", "scd", "--teacher", str(tmp_path / "teacher" / "ckpt.pt"), "--class-cond",
                 "--cfg-max", "2", "--cfg-scale", "1.5", "--discrete-steps", "18"]
    scm.main(args)
    log = [json.loads(l) for l in open(tmp_path / "img" / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) and r["mse"] > 0 for r in log)
    assert (tmp_path / "img" / "samples" / "step2_nfe1.png").exists()
    assert (tmp_path / "img" / "samples" / "step2_nfe2.png").exists()
    assert load_state(tmp_path / "img" / "ckpt.pt")["step"] == 2


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_resume_is_bit_identical(mode, labelled_teacher, tmp_path):
    args = ["--dataset", "moons", "--batch-size", "32", "--eval-samples", "64", "--log-every", "2",
            "--warmup-iters", "4", "--dropout", "0.1", "--mode", mode]
    if mode == "scd":
        args += ["--teacher", str(labelled_teacher), "--class-cond", "--cfg-max", "2"]
    scm.main(args + ["--steps", "6", "--out", str(tmp_path / "a")])
    scm.main(args + ["--steps", "3", "--out", str(tmp_path / "b")])
    scm.main(args + ["--steps", "6", "--out", str(tmp_path / "b"), "--resume"])
    a, b = load_state(tmp_path / "a" / "ckpt.pt"), load_state(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 6 and "weight" in a
    a.pop("cfg"), b.pop("cfg")
    assert_states_equal(a, b)


def test_ddp_step(tmp_path, run_torchrun):
    check_ddp_step(run_torchrun, tmp_path, "scm", ["sct", "scd-cfg", "discrete"])


# ---------------------------------------------------------------------------------------------
# Bad input

@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory, labelled_teacher):
    """A checkpoint of another method and an sCT (not diffusion) checkpoint."""
    root = tmp_path_factory.mktemp("others")
    common.save_checkpoint(str(root / "direct.pt"), {"cfg": {"method": "direct"}, "ema_v": {}})
    scm.main(["--dataset", "moons", "--steps", "1", "--eval-samples", "16", "--out", str(root / "sct")])
    return {"direct": str(root / "direct.pt"), "sct": str(root / "sct" / "ckpt.pt"), "labelled": str(labelled_teacher)}


@pytest.mark.parametrize("args,message", [
    (["--dataset", "moons", "--mode", "scd"], "needs --teacher"),
    (["--dataset", "moons", "--mode", "scd", "--teacher", "{direct}"], "written by direct.py, not scm.py"),
    (["--dataset", "moons", "--mode", "scd", "--teacher", "{sct}"], "must be a diffusion model"),
    (["--dataset", "checkerboard", "--mode", "scd", "--teacher", "{labelled}"], "trained on moons"),
    (["--dataset", "moons", "--mode", "scd", "--teacher", "{labelled}", "--sigma-d", "0.5"], "sigma_d"),
    (["--dataset", "moons", "--mode", "scd", "--teacher", "{labelled}", "--class-cond", "--model", "DiT-T/2"],
     "square images"),
    (["--dataset", "moons", "--mode", "sct", "--init", "{labelled}", "--class-cond", "--time-scale", "1000"],
     "time_scale"),
    (["--dataset", "moons", "--mode", "scd", "--teacher", "/nonexistent.pt"], "checkpoint not found"),
    (["--dataset", "moons", "--mode", "sct", "--teacher", "{labelled}"], "only used by --mode scd"),
    (["--dataset", "moons", "--cfg-max", "2"], "for --mode scd"),
    (["--dataset", "moons", "--mode", "scd", "--teacher", "{labelled}", "--cfg-max", "2"], "class-conditional"),
    (["--dataset", "moons", "--cfg-scale", "1.5"], "needs a guided model"),
    (["--dataset", "moons", "--nfe", "4", "--mid-times", "1.1"], "needs 3 --mid-times"),
    (["--dataset", "moons", "--mid-times", "0.5", "1.0"], "must decrease"),
    (["--dataset", "moons", "--resume", "--out", "/nonexistent/run"], "no checkpoint"),
    (["--sample-only", "--ckpt", "/nonexistent.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line(args, message, other_checkpoints, capsys, tmp_path):
    args = [a.format(**other_checkpoints) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    code, err = run_cli(scm.main, args, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_script_entry_point():
    res = subprocess.run([sys.executable, "scm.py", "--dataset", "moons", "--mode", "scd"], cwd=ROOT,
                         capture_output=True, text=True, env=cpu_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --mode scd needs --teacher CKPT (a model trained with `scm.py --mode diffusion`)"]
