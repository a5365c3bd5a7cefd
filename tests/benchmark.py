"""Side-by-side figures for the README (not a test: run it by hand).

    python tests/benchmark.py                         # CPU default: DiT-S/2 at 32x32, batch 8
    python tests/benchmark.py --skip toy digits --device cuda --model DiT-B/2 --batch 128 --bf16 --json bench.json
    python tests/benchmark.py --skip toy digits --device cuda --model DiT-XL/2 --batch 64 --channels 4 --bf16

Table a, training-step cost: one full update of each method (and its variants) against its reference step,
plain flow matching of the same backbone, batch and device (sCM: its own diffusion step). One entry is built
at a time, so the largest model fits one GPU: for each reference, blocks of `--repeats` timed updates (after
`--warmup` untimed ones, which also absorb torch.compile's compilation) alternate between the reference and
each of its entries, R E1 R E2 R ..., each block built alone and freed after; an entry's ratio is its median
over the mean of the reference medians just before and after it, so drift cancels. Per row: seconds per
update, the ratio, the peak memory of that entry alone (CUDA: the peak over what was allocated before it was
built), the FLOPs of one update (counted by torch.utils.flop_counter on an eager build at a small batch, scaled
to the batch) and the TFLOP/s they give, against the device's peak when it is known (PEAK_TFLOPS or
--peak-tflops). An entry that cannot take the batch (an MMD group larger than it) is skipped with the reason.

Every entry of STEPS builds its update from the method file's own draw and loss functions, through
common.Run.update (the guarded update every training loop uses) and Run.wrap (DDP, --compile):
    @step_cost("<method>/<variant>", reference="fm/plain", goal=None)
    def builder(spec, run) -> step()            (one update; spec: model, batch, size, channels)

Table b, sample quality on a 2D toy set: every entry of TOYS trains its method with the method's
own toy preset through the script's `main` (in this process) and returns the sliced Wasserstein
distances its run wrote to eval.json, per sampler and NFE:
    TOYS["<method>"] = runner(dataset, out, steps, flags) -> {"<method>/<sampler>": {nfe: swd}}
steps=None keeps the preset's length (--toy-steps shortens every run for a smoke test); flags go to every run
(--toy-flags: a smoke test's small sample counts). The table adds
the noise prior and the data-vs-data floor (two independent held-out sets of the same size).

Table c, sample quality on real images (scikit-learn's 8x8 digits, DiT-T/2): every entry of DIGITS trains
with its method's digits preset through the script's `main` and returns the digits figure its runs wrote to
eval.json (Frechet distance to the held-out digits in a small classifier's features, and the effective
number of classes), per sampler and NFE:
    DIGITS["<entry>"] = runner(runs, steps, flags) -> {"<method>/<sampler>": {nfe: {"fd": x, "modes": y}}}
Each entry is one chain of runs (a teacher, then what distils it) in its own folders under `runs`; with
--digits-jobs N the entries run as N processes at a time (on one GPU: --digits-flags='--device cuda').
The flow-matching baseline is DE-CM's teacher (`decm.py --losses fm`, plain flow matching on the same DiT
and step budget) with Euler steps; the table adds the floor (held-out vs training digits) and the ceiling
(Gaussian noise), and checks the goals of the digits issue.
"""
import argparse
import contextlib
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402

STEPS = {}
REFERENCE = {}          # the step each entry's goal is measured against (fm/plain unless said otherwise)
GOAL = {}               # the step-cost goal from the method's issue, as a ratio to its reference
TOYS = {}
TOY_NFES = (1, 2, 4, 100)
DIGITS = {}
DIGITS_NFES = (1, 2, 4, 8, 100)
TOY_EVAL_SAMPLES = 4096                 # the scripts' default --eval-samples for toy sets
# Dense peak TFLOP/s (bf16, TF32) of tensor-core GPUs, from NVIDIA's data sheets (SXM parts unless named); the
# device name is matched against the longest key it contains. --peak-tflops overrides.
PEAK_TFLOPS = {"A100": (312, 156), "A800": (312, 156), "H100": (989, 494), "H100 PCIe": (756, 378),
               "H100 NVL": (835, 418), "H800": (989, 494), "H200": (989, 494), "H200 NVL": (835, 418),
               "GH200": (989, 494), "L40S": (362, 183), "B200": (2250, 1100)}


class Skip(Exception):
    """An entry that cannot run at this setting; its row gives the reason."""


def step_cost(name, reference="fm/plain", goal=None):
    def register(fn):
        STEPS[name], REFERENCE[name], GOAL[name] = fn, reference, goal
        return fn
    return register


def toy_quality(method):
    def register(fn):
        TOYS[method] = fn
        return fn
    return register


def run_eval(main, argv, dataset, out, steps, flags):
    """Train with a method script's own main and its preset for `dataset`; returns its eval.json."""
    argv = ["--dataset", dataset, "--out", out, "--log-every", "1000000", *flags, *argv]
    main(argv + (["--steps", str(steps)] if steps else []))
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def digits_quality(entry):
    def register(fn):
        DIGITS[entry] = fn
        return fn
    return register


def digits_eval(main, argv, out, steps, flags):
    return run_eval(main, argv, "digits", out, steps, flags)


def digits_scores(ev, suffix=""):
    """{nfe: {"fd": x, "modes": y}} of one sampler from an eval.json."""
    return {int(k): {"fd": v, "modes": ev["modes" + suffix][k]} for k, v in ev["fd" + suffix].items()}


def nfe_scores(scores):
    return {int(k): v for k, v in scores.items()}


class ImageShape:
    """A stand-in data set for building backbones: shape and number of classes only."""
    kind = "image"

    def __init__(self, size, channels=3, num_classes=10):
        self.shape, self.num_classes = (channels, size, size), num_classes


def backbone(spec, **kw):
    return common.build_backbone({"model": spec.model}, ImageShape(spec.size, spec.channels), **kw)


def batch_of(spec, device):
    return torch.randn(spec.batch, spec.channels, spec.size, spec.size, device=device)


@step_cost("fm/plain")
def fm_step(spec, run):
    """The reference: flow matching, x_t = (1-t) z + t x, one forward-backward, AdamW."""
    net = backbone(spec)
    model = run.wrap(net)
    opt = common.make_optimizer("adamw", net.parameters(), 1e-4)
    x = batch_of(spec, run.device)

    def loss_fn(b):
        x_t, v = common.NoiseAt0()(b["x"], b["z"], b["t"])
        return {"loss": (model(x_t, b["t"]) - v).float().pow(2).mean()}

    def step():
        batch = dict(x=x, z=torch.randn_like(x), t=torch.rand(len(x), device=x.device))
        run.update(opt, net.parameters(), loss_fn, batch)
    return step


@step_cost("direct/default", goal=2.8)
def direct_step(spec, run):
    """Direct Models, Alg. 1: CFM forward-backward, two forwards without gradient, w forward-backward."""
    import direct
    cfg = {**direct.DEFAULTS, "param": "tw", "stop_grad": True}
    v, w = backbone(spec), backbone(spec)
    v_model, w_model = run.wrap(v), run.wrap(w)
    params = list(v.parameters()) + list(w.parameters())
    opt = common.make_optimizer("adamw", params, 1e-4)
    x = batch_of(spec, run.device)

    def step():
        run.update(opt, params, lambda b: direct.direct_losses(v_model, w_model, b, cfg), direct.draw(x, None, cfg))
    return step


def decm_setup(spec, run, losses):
    """A DE-CM student (two times) and its frozen one-time teacher, unconditional, the defaults of decm.py."""
    import decm
    cfg = {**decm.DEFAULTS, **decm.ROLE_DEFAULTS["student"], "losses": losses}
    student = backbone(spec, two_times=True, time_scale=cfg["time_scale"])
    model = run.wrap(student)
    teacher = backbone(spec, time_scale=cfg["time_scale"]).to(run.device).eval().requires_grad_(False)
    opt = common.make_optimizer("adamw", student.parameters(), 1e-4)

    x = batch_of(spec, run.device)

    def velocity(x, t, y):
        return teacher(x, t, y=y)

    def prepare(with_n2n):                               # the teacher's passes, under the run's precision
        with run.precision():
            return decm.prepare(x, None, velocity, cfg, with_n2n)
    return decm, cfg, student, model, opt, velocity, prepare


@step_cost("decm/cd+fm", goal=3.6)
def decm_cd_fm_step(spec, run):
    """DE-CM Alg. 1 l.2-15: one teacher forward without gradient, one JVP (no graph), one forward-backward
    over F(z_t, t, 1) and F(z_t, t, t) batched."""
    decm, cfg, student, model, opt, velocity, prepare = decm_setup(spec, run, ["fm", "cd"])

    def step():
        run.update(opt, student.parameters(), lambda b: decm.cd_fm_loss(model, b, None, cfg), prepare(False))
    return step


@step_cost("decm/n2n+fm")
def decm_n2n_fm_step(spec, run):
    """DE-CM Alg. 1 l.17-28: the teacher at z_t and z_r (one batched forward; in training it is shared with
    that iteration's CD+FM update), one JVP, the teacher at f(z_r, r, t) for v_psi, one forward-backward
    over F(z_r, r, t) and F(z_t, t, t) batched."""
    decm, cfg, student, model, opt, velocity, prepare = decm_setup(spec, run, ["fm", "cd", "n2n"])

    def step():
        run.update(opt, student.parameters(), lambda b: decm.n2n_fm_loss(model, velocity, b, None, cfg), prepare(True))
    return step


@toy_quality("direct")
def direct_toy(dataset, out, steps, flags):
    """The one-step direct map, and its jointly trained v_theta (pure CFM, Eq. 15) with the Euler sampler:
    the flow-matching baseline at 1, 4 and 100 steps."""
    import direct
    ev = run_eval(direct.main, ["--euler-steps", "1", "4", "100"], dataset, out, steps, flags)
    return {"direct/one-step": nfe_scores(ev["swd"]), "fm/euler": nfe_scores(ev["swd_euler"])}


def gcm_step(flags):
    """A GCM update (CU unless flags say otherwise) with the paper's RAdam, built from gcm.gcm_losses."""
    def build(spec, run):
        import gcm
        cfg = gcm.parse_config(["--dataset", "cifar10", "--out", run.out, "--batch-size", str(spec.batch),
                                "--model", spec.model, "--dropout", "0"] + flags)
        if spec.batch % cfg["mmd_group"]:
            raise Skip(f"batch {spec.batch} is not a multiple of the MMD group of {cfg['mmd_group']}")
        net = gcm.build_model(cfg, ImageShape(spec.size, spec.channels))
        model = run.wrap(net)
        opt = common.make_optimizer(cfg["optimizer"], net.parameters(), cfg["lr"], betas=tuple(cfg["betas"]))
        x = batch_of(spec, run.device)

        def step():
            run.update(opt, net.parameters(), lambda b: gcm.gcm_losses(model, b, cfg, cfg["eps"]),
                       gcm.draw(x, None, cfg))
        return step
    return build


def scm_step(mode, **flags):
    """sCM, Alg. 1, built from scm.py's own functions on the backbone of its image presets (adaptive double
    normalisation, c_noise(t) = t at time scale 1), with the same AdamW as fm/plain so the ratio measures
    the method, not the optimizer. sCT: one JVP (no graph) + one forward-backward; sCD adds the teacher's
    forward (two batched branches with CFG)."""
    def build(spec, run):
        import scm
        cfg = {**scm.DEFAULTS, "mode": mode, "class_cond": "cfg_max" in flags, "warmup_iters": 100, **flags}
        kw = dict(time_scale=cfg["time_scale"], adanorm=cfg["adanorm"])
        if cfg["class_cond"]:
            kw.update(num_classes=10)
        net = backbone(spec, extra_cond=scm.guided(cfg), **kw)
        weight = scm.AdaptiveWeight(cfg["sigma_d"])
        model, weight_model = run.wrap(net), run.wrap(weight)
        params = list(net.parameters()) + list(weight.parameters())
        opt = common.make_optimizer("adamw", params, 1e-4)
        x = batch_of(spec, run.device)
        y = torch.randint(0, 10, (spec.batch,), device=run.device) if cfg["class_cond"] else None
        teacher = None
        if mode == "scd":
            teacher = backbone(spec, class_dropout=0.1, **kw).to(run.device).eval().requires_grad_(False)

        def loss_fn(b):
            if mode == "diffusion":
                return scm.teacher_losses(model, b, cfg)
            return scm.scm_losses(model, weight_model, b, 50, cfg, teacher)

        def step():
            run.update(opt, params, loss_fn, scm.draw(x, y, cfg))
        return step
    return build


# Eq. (39): one forward-backward + one forward without gradient; the MMD (Eq. 46) adds only the
# pairwise distances; Eq. (6): a forward-mode JVP instead of the second forward.
step_cost("gcm/cu-fd-l2", goal=1.5)(gcm_step(["--mmd-group", "1"]))
step_cost("gcm/cu-fd-mmd", goal=1.5)(gcm_step([]))
step_cost("gcm/vu-fd-mmd", goal=1.5)(gcm_step(["--variant", "vu"]))
step_cost("gcm/cu-analytic")(gcm_step(["--mmd-group", "1", "--jvp", "analytic"]))


def gcm_toy(variant, sampler):
    """GCM's toy preset (Table 1, every module on): CU with the restart sampler or VU with the pushforward
    sampler, at 1, 2 and 4 NFE. One entry per variant, so each row gets its own training time."""
    def runner(dataset, out, steps, flags):
        import gcm
        ev = run_eval(gcm.main, ["--variant", variant, "--nfe", "1", "2", "4"], dataset, out, steps, flags)
        return {f"gcm/{variant}-{sampler}": nfe_scores(ev["swd"])}
    return runner


toy_quality("gcm-cu")(gcm_toy("cu", "restart"))
toy_quality("gcm-vu")(gcm_toy("vu", "pushforward"))


# Issue 3's goal is against a plain diffusion step of the same backbone (scm/diffusion, Eq. 4). With CFG
# the teacher runs two branches, one forward more than unguided sCD; the goal names sCT and sCD.
step_cost("scm/diffusion")(scm_step("diffusion"))
step_cost("scm/sct", reference="scm/diffusion", goal=2.2)(scm_step("sct"))
step_cost("scm/scd", reference="scm/diffusion", goal=2.2)(scm_step("scd"))
step_cost("scm/scd-cfg", reference="scm/diffusion")(scm_step("scd", cfg_max=2.0))
step_cost("scm/sct-discrete", reference="scm/diffusion")(scm_step("sct", discrete_steps=18))


@toy_quality("scm")
def scm_toy(dataset, out, steps, flags):
    """scm.py's own toy preset: sCT and sCD (Alg. 1 with every stabiliser) with the consistency sampler of
    Section 5.2 at 1, 2 and 4 f evaluations (intermediate times 1.1 for 2 steps; 1.1, 0.73, 0.37 for 4), and
    the sCD teacher (Eq. 4) with its PF-ODE sampler (Eq. 3, DDIM steps) at 1, 2, 4 and 100 steps."""
    import scm
    sct = run_eval(scm.main, ["--mode", "sct", "--nfe", "1", "2", "4"], dataset, os.path.join(out, "sct"),
                   steps, flags)
    teacher = run_eval(scm.main, ["--mode", "diffusion", "--nfe", "1", "2", "4", "100"], dataset,
                       os.path.join(out, "teacher"), steps, flags)
    scd = run_eval(scm.main, ["--mode", "scd", "--teacher", os.path.join(out, "teacher", "ckpt.pt"), "--nfe", "1", "2",
                              "4"], dataset, os.path.join(out, "scd"), steps, flags)
    return {"scm/sct": nfe_scores(sct["swd"]), "scm/scd": nfe_scores(scd["swd"]),
            "scm/teacher-ode": nfe_scores(teacher["swd"])}


@toy_quality("decm")
def decm_toy(dataset, out, steps, flags):
    """DE-CM with its toy preset: `decm.py --dataset D` trains the FM teacher into OUT/teacher, then the
    student (fm,cd,n2n); the CM, Mix and Euler samplers of Table 4 at 1, 2, 4 NFE, and the teacher's Euler.
    1500 teacher + 1200 student steps (the preset's 2000 + 2000 would take over 3 minutes on 2 cores; the
    notebook shows 1000 student steps already near the floor)."""
    import decm
    teacher_steps = ["--teacher-steps", str(steps or 1500)]
    ev = run_eval(decm.main, ["--samplers", "cm", "mix", "euler", "--nfe", "1", "2", "4", *teacher_steps],
                  dataset, out, steps or 1200, flags)
    with open(os.path.join(out, "teacher", "eval.json")) as f:
        teacher = json.load(f)
    rows = {f"decm/{s}": nfe_scores(ev[f"swd_{s}"]) for s in ("cm", "mix", "euler")}
    return {**rows, "decm/FM-teacher-euler": nfe_scores(teacher["swd"])}


def _nfes(*nfes):
    return ["--nfe", *map(str, nfes)]


@digits_quality("fm+decm")
def decm_digits(runs, steps, flags):
    """The flow-matching baseline: DE-CM's teacher is plain flow matching (Eq. 3, uniform t, no cosine term)
    on the same DiT and step budget, sampled with Euler. Then the DE-CM student distilled from it (the
    preset's fm,cd,n2n) with the CM, Mix (Euler first, the paper's; and flow-map first) and Euler samplers."""
    import decm
    out = os.path.join(runs, "digits-fm-decm")
    teacher = digits_eval(decm.main, ["--losses", "fm", *_nfes(*DIGITS_NFES)], os.path.join(out, "fm"), steps, flags)
    student = digits_eval(decm.main, ["--teacher", os.path.join(out, "fm", "ckpt.pt"), *_nfes(1, 2, 4),
                                      "--samplers", "cm", "mix", "mix-flowmap", "euler"],
                          os.path.join(out, "decm"), steps, flags)
    return {"fm/euler": digits_scores(teacher),
            **{f"decm/{s}": digits_scores(student, "_" + s) for s in ("cm", "mix", "mix-flowmap", "euler")}}


@digits_quality("scm-teacher+scd")
def scd_digits(runs, steps, flags):
    """sCM: the TrigFlow teacher (Eq. 4) with its PF-ODE sampler, and sCD from it with the consistency sampler
    (intermediate time 1.1 for 2 steps)."""
    import scm
    out = os.path.join(runs, "digits-scm")
    teacher = digits_eval(scm.main, ["--mode", "diffusion", *_nfes(*DIGITS_NFES)], os.path.join(out, "teacher"),
                          steps, flags)
    scd = digits_eval(scm.main, ["--mode", "scd", "--teacher", os.path.join(out, "teacher", "ckpt.pt"),
                                 *_nfes(1, 2, 4)], os.path.join(out, "scd"), steps, flags)
    return {"scm/teacher-ode": digits_scores(teacher), "scm/scd": digits_scores(scd)}


@digits_quality("scm-sct")
def sct_digits(runs, steps, flags):
    """sCT from scratch, with the consistency sampler."""
    import scm
    sct = digits_eval(scm.main, ["--mode", "sct", *_nfes(1, 2, 4)], os.path.join(runs, "digits-scm", "sct"), steps,
                      flags)
    return {"scm/sct": digits_scores(sct)}


def gcm_digits(variant, sampler):
    """GCM, every module of Table 1: CU with the restart sampler, or VU with the pushforward sampler."""
    def runner(runs, steps, flags):
        import gcm
        ev = digits_eval(gcm.main, ["--variant", variant, *_nfes(1, 2, 4)], os.path.join(runs, "digits-gcm", variant),
                         steps, flags)
        return {f"gcm/{variant}-{sampler}": digits_scores(ev)}
    return runner


digits_quality("gcm-cu")(gcm_digits("cu", "restart"))
digits_quality("gcm-vu")(gcm_digits("vu", "pushforward"))


@digits_quality("direct")
def direct_digits(runs, steps, flags):
    """Direct: the one-step map, and the velocity field trained jointly with it (pure CFM) under Euler."""
    import direct
    ev = digits_eval(direct.main, ["--euler-steps", *map(str, DIGITS_NFES)], os.path.join(runs, "digits-direct", "direct"),
                     steps, flags)
    return {"direct/one-step": digits_scores(ev), "direct/v-euler": digits_scores(ev, "_euler")}


# Class-conditional runs with classifier-free guidance, for the methods that use it, in runs/digits-cfg.
@digits_quality("cfg-fm+decm")
def cfg_decm_digits(runs, steps, flags):
    """A guided FM teacher (label dropout 0.1; Euler with CFG scale 1.5) and the DE-CM student distilled from it
    with guidance w_cfg 1.5 (velocity normalisation, Alg. 1 l.6)."""
    import decm
    out = os.path.join(runs, "digits-cfg")
    fm = digits_eval(decm.main, ["--losses", "fm", "--class-cond", "--w-cfg", "1.5", *_nfes(*DIGITS_NFES)],
                     os.path.join(out, "fm"), steps, flags)
    de = digits_eval(decm.main, ["--teacher", os.path.join(out, "fm", "ckpt.pt"), "--w-cfg", "1.5", *_nfes(1, 2, 4)],
                     os.path.join(out, "decm"), steps, flags)
    return {"fm/euler-cfg1.5": digits_scores(fm), "decm/auto-cfg1.5": digits_scores(de)}


@digits_quality("cfg-scm")
def cfg_scd_digits(runs, steps, flags):
    """sCD with w ~ U[1, 2] as a student input from a class-conditional TrigFlow teacher, sampled at 1.5."""
    import scm
    out = os.path.join(runs, "digits-cfg")
    teacher = digits_eval(scm.main, ["--mode", "diffusion", "--class-cond", "--class-dropout", "0.1", "--cfg-scale",
                                     "1.5", *_nfes(8, 100)], os.path.join(out, "scm-teacher"), steps, flags)
    scd = digits_eval(scm.main, ["--mode", "scd", "--class-cond", "--teacher", os.path.join(out, "scm-teacher", "ckpt.pt"),
                                 "--cfg-max", "2", "--cfg-scale", "1.5", *_nfes(1, 2, 4)],
                      os.path.join(out, "scd"), steps, flags)
    return {"scm/teacher-ode-cfg1.5": digits_scores(teacher), "scm/scd-cfg1.5": digits_scores(scd)}


@digits_quality("cfg-direct")
def cfg_direct_digits(runs, steps, flags):
    """Direct with CFG 1.5 inside the propagation target (label dropout 0.1 for v_theta)."""
    import direct
    dm = digits_eval(direct.main, ["--class-cond", "--class-dropout", "0.1", "--cfg-scale", "1.5", "--euler-steps",
                                   "100"], os.path.join(runs, "digits-cfg", "direct"), steps, flags)
    return {"direct/one-step-cfg1.5": digits_scores(dm), "direct/v-euler-cfg1.5": digits_scores(dm, "_euler")}


def digits_entry(entry, runs, steps, flags, data_path):
    """Train one entry's chain of runs; its rows and each row's training seconds."""
    t0 = time.perf_counter()
    rows = DIGITS[entry](runs, steps, ["--data-path", data_path, *flags])
    return rows, {r: time.perf_counter() - t0 for r in rows}


def digits_entries(only):
    """The entries --only names (all without --only)."""
    return [e for e in DIGITS if not only or e in only]


def digits_table(steps, only, tmp, flags=(), data_path=None, jobs=1, budget=None):
    """Table c: {row: {nfe: {"fd", "modes"}}} and each row's training seconds, then the floor and ceiling. With
    jobs > 1 the entries run as that many processes at a time (this script with --digits-entry), each writing
    its rows to a JSON file and its output to runs/logs/<entry>.log; those still running after `budget`
    seconds are stopped, and the table holds the others."""
    rows, seconds = {}, {}
    data_path = data_path or os.path.join(tmp, "digits-data")
    quality = common.DigitsQuality(data_path)                     # trains (and caches) the classifier once
    entries = digits_entries(only)
    if jobs <= 1:
        for entry in entries:
            res, secs = digits_entry(entry, tmp, steps, flags, data_path)
            rows.update(res)
            seconds.update(secs)
    else:
        os.makedirs(os.path.join(tmp, "logs"), exist_ok=True)
        waiting, running, failed, finished = list(entries), {}, [], {}
        deadline = time.time() + budget if budget else float("inf")
        while waiting or running:
            if time.time() > deadline:
                for entry, (proc, _, _) in running.items():
                    proc.terminate()
                print(f"digits entries stopped after {budget} s: {', '.join(running)}; not started: "
                      f"{', '.join(waiting) or 'none'}", file=sys.stderr, flush=True)
                failed += list(running) + waiting
                waiting = []
            while waiting and len(running) < jobs:
                entry = waiting.pop(0)
                part = os.path.join(tmp, "logs", f"{entry}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--digits-entry", entry, "--keep-runs", tmp,
                       "--json", part, "--digits-data", data_path, "--digits-flags", shlex.join(flags)]
                cmd += ["--digits-steps", str(steps)] if steps else []
                log = open(os.path.join(tmp, "logs", f"{entry}.log"), "w")
                running[entry] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, part)
            time.sleep(1)
            for entry, (proc, log, part) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[entry]
                if proc.returncode:
                    failed.append(entry)
                    continue
                with open(part) as f:
                    done = json.load(f)
                finished[entry] = {r: {int(k): v for k, v in s.items()} for r, s in done["rows"].items()}
                seconds.update(done["seconds"])
        for entry in entries:                                   # rows in the entries' order, not the finishing one
            rows.update(finished.get(entry, {}))
        if failed:
            print(f"digits entries that failed (see {os.path.join(tmp, 'logs')}): {', '.join(failed)}", file=sys.stderr)
    floor, ceiling = quality.floor(), quality.ceiling()
    rows["held-out vs training digits (floor)"] = {0: {"fd": floor["fd"], "modes": floor["modes"]}}
    rows["Gaussian noise (ceiling)"] = {0: {"fd": ceiling["fd"], "modes": ceiling["modes"]}}
    return rows, seconds, quality.accuracy


def digits_markdown(rows, seconds):
    head = "| method / sampler | " + " | ".join(f"{k} NFE" for k in DIGITS_NFES) + " | train s |"
    lines = [head, "|---|" + "---|" * (len(DIGITS_NFES) + 1)]
    for name, scores in rows.items():
        def cell(k):
            return f"{scores[k]['fd']:.1f} ({scores[k]['modes']:.1f})" if k in scores else "-"
        cells = [cell(0)] + [""] * (len(DIGITS_NFES) - 1) if 0 in scores else [cell(k) for k in DIGITS_NFES]
        t = f"{seconds[name]:.0f}" if name in seconds else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t} |")
    return "\n".join(lines)


def digits_goals(rows):
    """The digits issue's goals: per method, the best FD at 1 or 2 NFE within 2x of the flow-matching
    baseline at 100 Euler steps, and the 1-NFE FD below a quarter of the ceiling; and whether more steps
    help where the papers claim it (sCM 2 vs 1, GCM CU restart 2 vs 1, DE-CM Mix vs CM at 4)."""
    base = rows["fm/euler"][100]["fd"]
    ceiling = rows["Gaussian noise (ceiling)"][0]["fd"]
    goals = {}
    for name, scores in rows.items():
        if name.startswith(("fm/", "held-out", "Gaussian")) or "euler" in name or "teacher" in name or 1 not in scores:
            continue
        # a guided row is held against the guided baseline (class-conditional FM, Euler 100 at the same scale)
        ref = "fm/euler" + name[name.index("-cfg"):] if "-cfg" in name else "fm/euler"
        ref_fd = rows[ref][100]["fd"] if ref in rows and 100 in rows[ref] else base
        best = min(scores[k]["fd"] for k in (1, 2) if k in scores)
        goals[name] = {"best_1_2": best, "baseline": ref, "baseline_fd": ref_fd,
                       "within_2x_baseline": best <= 2 * ref_fd,
                       "below_quarter_ceiling_1nfe": scores[1]["fd"] < ceiling / 4}
    claims = {}
    for name in ("scm/sct", "scm/scd", "gcm/cu-restart"):
        if name in rows and 2 in rows[name]:
            claims[f"{name}: 2 NFE better than 1"] = rows[name][2]["fd"] < rows[name][1]["fd"]
    if "decm/mix" in rows and "decm/cm" in rows:
        claims["decm: Mix better than CM at 4 NFE"] = rows["decm/mix"][4]["fd"] < rows["decm/cm"][4]["fd"]
    return {"fm100": base, "ceiling": ceiling, "methods": goals, "claims": claims}


# The digits figure of the README: per row a run folder (under the benchmark's run folder) and the sampler name
# its samples/[<sampler>_]nfe{k}.npz carry; columns 1, 2 and 4 NFE (100 for the Euler baselines' last panel).
DIGITS_FIGURE = [("flow matching, Euler", "digits-fm-decm/fm", "", (1, 2, 4, 100)),
                 ("DE-CM, CM", "digits-fm-decm/decm", "cm", (1, 2, 4)),
                 ("DE-CM, Mix", "digits-fm-decm/decm", "mix", (1, 2, 4)),
                 ("sCM teacher, ODE", "digits-scm/teacher", "", (1, 2, 4, 100)),
                 ("sCT", "digits-scm/sct", "", (1, 2, 4)),
                 ("sCD", "digits-scm/scd", "", (1, 2, 4)),
                 ("GCM CU, restart", "digits-gcm/cu", "", (1, 2, 4)),
                 ("GCM VU, pushforward", "digits-gcm/vu", "", (1, 2, 4)),
                 ("Direct, one step", "digits-direct/direct", "", (1,)),
                 ("Direct's v, Euler", "digits-direct/direct", "euler", (1, 2, 4, 100))]
DIGITS_FIGURE_CFG = [("flow matching, Euler", "digits-cfg/fm", "", (1, 2, 4, 100)),
                     ("DE-CM", "digits-cfg/decm", "", (1, 2, 4)),
                     ("sCM teacher, ODE", "digits-cfg/scm-teacher", "", (100,)),
                     ("sCD", "digits-cfg/scd", "", (1, 2, 4)),
                     ("Direct, one step", "digits-cfg/direct", "", (1,))]


def digits_figure(runs, path, rows=DIGITS_FIGURE, per_side=8):
    """One PNG of the digits runs in `runs`: a row per entry of `rows` (DIGITS_FIGURE), a panel per NFE holding the
    first per_side^2 samples of samples/[<sampler>_]nfe{k}.npz, titled with the FD that eval.json gives for it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = sorted({k for *_, nfes in rows for k in nfes})
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.2 * len(cols), 2.35 * len(rows)), squeeze=False)
    for r, (label, folder, sampler, nfes) in enumerate(rows):
        axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
        if not os.path.isfile(os.path.join(runs, folder, "eval.json")):       # not run, or stopped (--digits-budget)
            for ax in axes[r]:
                ax.axis("off")
            continue
        with open(os.path.join(runs, folder, "eval.json")) as f:
            fd = json.load(f)["fd" + ("_" + sampler if sampler else "")]
        for c, k in enumerate(cols):
            ax = axes[r, c]
            ax.axis("off")
            if k not in nfes:
                continue
            with np.load(os.path.join(runs, folder, "samples", f"{sampler + '_' if sampler else ''}nfe{k}.npz")) as f:
                x = f["arr_0"]
            n = min(per_side, int(np.sqrt(len(x))))                 # a smoke run may hold fewer samples
            ax.imshow(common.image_grid(x[: n * n], n, pad_value=0.4), interpolation="nearest")   # grey frames
            ax.set_title(f"{k} NFE: {fd[str(k)]:.0f}", fontsize=8)
    fig.subplots_adjust(left=0.16, right=0.99, top=1 - 0.2 / len(rows), bottom=0.01, wspace=0.06, hspace=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ==============================================================================================
# Table d: the digits figure along a compute axis
#
# One long run per chain and seed, the largest budget times the presets' 1500 steps (the budget unit), with a
# snapshot each time it passes a multiple of the unit's images; budget k is scored from the snapshot at k units
# by the script's own --sample-only. No digits preset has a schedule that depends on the run's length (a
# constant learning rate, the EMA's half-life in images, sCM's tangent warmup and GCM's curriculum off), so that
# snapshot is the end of the run `--steps k*1500`, bit for bit (tests/test_benchmark.py checks it). A distilled
# chain learns from its teacher chain's snapshot at --teacher-budget (default: the largest budget) of the same
# seed, and its cost counts that teacher's run up to there.
CURVE_BUDGETS = (1, 2, 4, 8)
_FEW = ("--nfe", "1", "2", "4", "8")
_BASELINE = ("--nfe", "1", "2", "4", "8", "100")
_DECM_EVAL = ("--samplers", "cm", "mix", "euler", "--nfe", "1", "2", "4", "8", "16", "50")
_DIRECT_EVAL = ("--nfe", "1", "--euler-steps", "1", "2", "4", "8", "100")
_DECM_ROWS = {"cm": "_cm", "mix": "_mix", "euler": "_euler"}
# chain: (script, training flags, the chain it distils or None, --sample-only flags, {row: eval.json suffix})
CHAINS = {
    "fm": ("decm.py", ["--losses", "fm"], None, _BASELINE, {"fm/euler": ""}),
    "scm-teacher": ("scm.py", ["--mode", "diffusion"], None, _BASELINE, {"scm/teacher-ode": ""}),
    "sct": ("scm.py", ["--mode", "sct"], None, _FEW, {"scm/sct": ""}),
    "gcm-cu": ("gcm.py", ["--variant", "cu"], None, _FEW, {"gcm/cu-restart": ""}),
    "gcm-vu": ("gcm.py", ["--variant", "vu"], None, _FEW, {"gcm/vu-pushforward": ""}),
    "direct": ("direct.py", [], None, _DIRECT_EVAL, {"direct/one-step": "", "direct/v-euler": "_euler"}),
    "decm": ("decm.py", [], "fm", _DECM_EVAL, {f"decm/{k}": v for k, v in _DECM_ROWS.items()}),
    "scd": ("scm.py", ["--mode", "scd"], "scm-teacher", _FEW, {"scm/scd": ""}),
    # the ablations of the papers' claims: DE-CM without N2N (Table 3 e), Direct without stop-gradient (Table 3)
    "decm-no-n2n": ("decm.py", ["--losses", "fm,cd"], "fm", _DECM_EVAL,
                    {f"decm-no-n2n/{k}": v for k, v in _DECM_ROWS.items()}),
    "direct-no-sg": ("direct.py", ["--no-stop-grad"], None, _DIRECT_EVAL,
                     {"direct-no-sg/one-step": "", "direct-no-sg/v-euler": "_euler"}),
}
# Sampler settings the papers chose for their data, scored again at the largest budget (RUN/at-<k>x-<name>): the
# intermediate time of sCM's 2-step sampler (1.1, chosen for CIFAR-10) and of GCM's 2-step samplers (t1 = 0.6),
# and the deterministic steps of DE-CM's Mix sampler (the paper does not give the split).
CURVE_SWEEPS = {"sct": {f"mid{t}": ["--nfe", "2", "--mid-times", str(t)] for t in (0.5, 0.8, 1.3)},
                "scd": {f"mid{t}": ["--nfe", "2", "--mid-times", str(t)] for t in (0.5, 0.8, 1.3)},
                "gcm-cu": {f"t1-{t}": ["--nfe", "2", "--t1", str(t)] for t in (0.3, 0.45, 0.8)},
                "gcm-vu": {f"t1-{t}": ["--nfe", "2", "--t1", str(t)] for t in (0.3, 0.45, 0.8)},
                "decm": {f"split{k}": ["--samplers", "mix", "--mix-split", str(k), "--nfe", "4", "8", "16"]
                         for k in (2, 3)}}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_dir(cv, seed, chain):
    return os.path.join(cv.root, f"seed{seed}", chain)


def snapshot_at(out, steps):
    """The path of a run's snapshot after `steps` updates (whether it is there yet or not); None before the run
    started (its batch size, in config.json, names the file)."""
    batch = common.read_json(os.path.join(out, "config.json")).get("batch_size")
    return batch and os.path.join(out, f"ckpt-{int(round(steps * batch / 1000, 3)):06d}.pt")


def curve_jobs(cv):
    """The jobs still to do, in the order to start them: (name, argv, ready). Scoring a snapshot (short) comes
    first, into RUN/at-<k>x/eval.json; a training resumes its run if there is one; a student waits for its
    teacher's snapshot."""
    train, score = [], []
    for seed in cv.seeds:
        for chain in cv.chains:
            script, flags, teacher, eval_flags, _ = CHAINS[chain]
            out = run_dir(cv, seed, chain)
            last = snapshot_at(out, max(cv.budgets) * cv.unit)
            if not (last and os.path.isfile(last)):
                argv = [script, "--dataset", "digits", "--out", out, "--seed", str(seed), "--threads", "1",
                        "--steps", str(max(cv.budgets) * cv.unit), "--data-path", cv.data_path, "--eval-samples", "0",
                        *flags, *cv.flags]
                ready = True
                if teacher:
                    path = snapshot_at(run_dir(cv, seed, teacher), cv.teacher_budget * cv.unit)
                    ready = bool(path and os.path.isfile(path))
                    argv += ["--teacher", str(path)]
                if os.path.isfile(os.path.join(out, "ckpt.pt")):
                    argv.append("--resume")
                train.append((f"seed{seed}/{chain}/train", argv, ready))
            evals = [(k, "", eval_flags) for k in cv.budgets]
            evals += [(max(cv.budgets), "-" + name, flags) for name, flags in CURVE_SWEEPS.get(chain, {}).items()]
            for k, name, flags in evals:
                snap, done = snapshot_at(out, k * cv.unit), os.path.join(out, f"at-{k}x{name}", "eval.json")
                if snap and os.path.isfile(snap) and not os.path.isfile(done):
                    argv = [script, "--sample-only", "--ckpt", snap, "--out", os.path.dirname(done), "--threads", "1",
                            "--eval-samples", str(cv.eval_samples), *flags]
                    score.append((f"seed{seed}/{chain}/eval-{k}x{name}", argv, True))
    return score + train


def with_snapshots(argv, unit):
    """A training job's argv with --snapshot-every one budget unit's images (kimg, from the run's batch)."""
    import importlib
    cfg = importlib.import_module(os.path.splitext(argv[0])[0]).parse_config(argv[1:])
    kimg = unit * cfg["batch_size"] / 1000
    if kimg != int(kimg):
        raise common.UserError(f"{unit} steps of batch {cfg['batch_size']} are not a whole number of kimg")
    return argv + ["--snapshot-every", str(int(kimg))]


def run_curves(cv, jobs_at_once):
    """Train and score every chain for every seed, `jobs_at_once` processes at a time (one thread each), until
    nothing is left; started again, it continues (every run resumes). SIGTERM or Ctrl-C stops the runs at a
    step boundary with a checkpoint (their own stop handling), then this. Returns the jobs left undone."""
    import signal
    os.makedirs(os.path.join(cv.root, "logs"), exist_ok=True)
    common.DigitsQuality(cv.data_path)                          # the classifier, trained once before the runs
    running, failed, stopping = {}, set(), []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    while True:
        todo = [j for j in curve_jobs(cv) if j[0] not in running and j[0] not in failed and j[2]]
        if stopping:
            for proc, _ in running.values():
                proc.send_signal(signal.SIGTERM)
        while todo and not stopping and len(running) < jobs_at_once:
            name, argv, _ = todo.pop(0)
            argv = with_snapshots(argv, cv.unit) if name.endswith("/train") else argv
            log = open(os.path.join(cv.root, "logs", name.replace("/", "-") + ".log"), "a")
            print(f"{time.strftime('%H:%M:%S')} start {name}", flush=True)
            running[name] = (subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"}), log)
        if not running:
            break
        time.sleep(1 if cv.unit < 100 else 5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                print(f"{time.strftime('%H:%M:%S')} {name} exited {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.add(name)
    left = [j[0] for j in curve_jobs(cv)]
    if left:
        print(f"not done ({'stopped' if stopping else 'failed, or waiting for what failed'}; see "
              f"{os.path.join(cv.root, 'logs')}): {', '.join(left)}", file=sys.stderr)
    return left


def update_flops(chains, data_path):
    """FLOPs of one training update of each chain (torch.utils.flop_counter: matmuls and attention in the
    forward, backward and JVP passes, the teacher's passes included; their batch as in the presets), and of
    one forward pass of the backbone on one image. Counted on the scripts' own main, in this process: a run of 9
    updates less a run of 3, over 6 (two whole periods of DE-CM's N2N update, every freq = 3 iterations);
    the rest of the two runs (building, the end grids) is the same and cancels."""
    import importlib
    from torch.utils.flop_counter import FlopCounterMode
    needed = set(chains) | {"fm"} | {CHAINS[c][2] for c in chains if CHAINS[c][2]}
    out, tmp = {}, tempfile.mkdtemp()
    for chain in sorted(needed, key=lambda c: (CHAINS[c][2] is not None, c)):       # teachers first
        script, flags, teacher, _, _ = CHAINS[chain]
        module = importlib.import_module(os.path.splitext(script)[0])
        counts = []
        for steps in (3, 9):
            argv = ["--dataset", "digits", "--out", os.path.join(tmp, f"{chain}-{steps}"), "--steps", str(steps),
                    "--data-path", data_path, "--eval-samples", "0", "--n", "1", "--threads", "1", *flags]
            argv += ["--teacher", os.path.join(tmp, f"{teacher}-3", "ckpt.pt")] if teacher else []
            with contextlib.redirect_stdout(None), FlopCounterMode(display=False) as counter:
                module.main(argv)
            counts.append(counter.get_total_flops())
        batch = common.read_json(os.path.join(tmp, f"{chain}-3", "config.json"))["batch_size"]
        out[chain] = {"flops_per_update": (counts[1] - counts[0]) / 6, "batch": batch}
    net = common.build_backbone({"model": "DiT-T/2"}, common.load_dataset("digits"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1))
    for chain in out:
        out[chain]["forward_flops_per_image"] = counter.get_total_flops()
    return out


def train_seconds(out, step):
    """Wall seconds a run spent on its first `step` updates, from log.jsonl's seconds per step."""
    total, last = 0.0, 0
    with open(os.path.join(out, "log.jsonl"), "rb") as f:
        for line in f:
            record = common._json_record(line)
            if record and "sec_per_step" in record and last < record["step"] <= step:
                total, last = total + (record["step"] - last) * record["sec_per_step"], record["step"]
    return total


def curves_report(cv, flops):
    """What the runs under cv.root have scored, and what each cost: {"chains": {chain: {"unit_cost",
    "teacher_cost", ...}}, "rows": {row: {"chain": c, "<k>": {"<seed>": {nfe: {"fd", "modes"}}}}},
    "seconds": {chain: {"<k>": {"<seed>": s}}}}. Costs are in flow-matching digits presets (one unit of fm)."""
    fm_unit = flops["fm"]["flops_per_update"] * cv.unit
    report = {"setting": {"unit_steps": cv.unit, "budgets": cv.budgets, "seeds": cv.seeds, "flags": cv.flags,
                          "teacher_budget": cv.teacher_budget, "eval_samples": cv.eval_samples},
              "chains": {}, "rows": {}, "seconds": {}, "sweeps": {}}
    for chain in cv.chains:
        teacher, f = CHAINS[chain][2], flops[chain]
        report["chains"][chain] = {
            "teacher": teacher, "flops_per_update": f["flops_per_update"], "batch": f["batch"],
            "forward_passes_per_image": f["flops_per_update"] / (f["batch"] * f["forward_flops_per_image"]),
            "unit_cost": f["flops_per_update"] * cv.unit / fm_unit,
            "teacher_cost": cv.teacher_budget * flops[teacher]["flops_per_update"] * cv.unit / fm_unit if teacher else 0}
        for seed in cv.seeds:
            out = run_dir(cv, seed, chain)
            for k in cv.budgets:
                ev = common.read_json(os.path.join(out, f"at-{k}x", "eval.json"))
                if not ev:
                    continue
                for row, suffix in CHAINS[chain][4].items():
                    report["rows"].setdefault(row, {"chain": chain}).setdefault(str(k), {})[str(seed)] = \
                        {str(n): v for n, v in digits_scores(ev, suffix).items()}
                report["seconds"].setdefault(chain, {}).setdefault(str(k), {})[str(seed)] = \
                    train_seconds(out, k * cv.unit)
            for name in CURVE_SWEEPS.get(chain, {}):
                ev = common.read_json(os.path.join(out, f"at-{max(cv.budgets)}x-{name}", "eval.json"))
                for row, suffix in CHAINS[chain][4].items():
                    if ev and "fd" + suffix in ev:
                        report["sweeps"].setdefault(row, {}).setdefault(name, {})[str(seed)] = \
                            {str(n): v for n, v in digits_scores(ev, suffix).items()}
    return report


def row_cost(report, row, k):
    """A row's training cost at budget k, in flow-matching presets: k of its own units, plus its teacher."""
    c = report["chains"][report["rows"][row]["chain"]]
    return c["teacher_cost"] + k * c["unit_cost"]


def band(report, row, k, nfe, seeds=None):
    """(median, lowest, highest, seeds) of a row's FD at budget k and `nfe` over `seeds` (default: every seed
    scored), or None where nothing is scored."""
    fds = [v[str(nfe)]["fd"] for s, v in report["rows"][row].get(str(k), {}).items()
           if str(nfe) in v and (seeds is None or s in seeds)]
    return (statistics.median(fds), min(fds), max(fds), len(fds)) if fds else None


def curves_markdown(report):
    """Table d: per row and NFE, the FD at every budget, median over the seeds [lowest, highest], and the cost."""
    budgets = report["setting"]["budgets"]
    lines = ["| method / sampler | NFE | cost of 1x | teacher | " + " | ".join(f"{k}x" for k in budgets) + " |",
             "|---|---|---|---|" + "---|" * len(budgets)]
    for row, data in report["rows"].items():
        c = report["chains"][data["chain"]]
        for nfe in sorted({int(n) for k in budgets for s in data.get(str(k), {}).values() for n in s}):
            cells = []
            for k in budgets:
                b = band(report, row, k, nfe)
                cells.append("-" if b is None else f"{b[0]:.0f}" + (f" [{b[1]:.0f}, {b[2]:.0f}]" if b[3] > 1 else ""))
            lines.append(f"| {row} | {nfe} | {c['unit_cost']:.2f} | {c['teacher_cost']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The papers' few-step claims that digits can test: (paper, claim, [(row a, nfe a), (row b, nfe b)]) reading
# "a beats b" (a lower FD), compared seed by seed at the largest budget (the same seed's runs share their data
# order and noise draws).
CLAIMS = [
    ("sCM", "2 steps better than 1 (sCT)", ("scm/sct", 2), ("scm/sct", 1)),
    ("sCM", "2 steps better than 1 (sCD)", ("scm/scd", 2), ("scm/scd", 1)),
    ("sCM", "sCD at 2 steps close to (here: better than) its teacher's ODE at 8 steps", ("scm/scd", 2), ("scm/teacher-ode", 8)),
    ("GCM", "CU's restart sampler improves with steps (2 vs 1)", ("gcm/cu-restart", 2), ("gcm/cu-restart", 1)),
    ("GCM", "VU's pushforward sampler improves with steps (2 vs 1)", ("gcm/vu-pushforward", 2), ("gcm/vu-pushforward", 1)),
    ("GCM", "VU better than CU at 1 step", ("gcm/vu-pushforward", 1), ("gcm/cu-restart", 1)),
    ("GCM", "VU better than CU at 2 steps", ("gcm/vu-pushforward", 2), ("gcm/cu-restart", 2)),
    ("DE-CM", "Mix better than CM at 4 NFE", ("decm/mix", 4), ("decm/cm", 4)),
    ("DE-CM", "Mix better than CM at 8 NFE", ("decm/mix", 8), ("decm/cm", 8)),
    ("DE-CM", "Mix better than CM at 16 NFE", ("decm/mix", 16), ("decm/cm", 16)),
    ("DE-CM", "N2N improves multi-step sampling (Mix, 4 NFE)", ("decm/mix", 4), ("decm-no-n2n/mix", 4)),
    ("DE-CM", "N2N improves multi-step sampling (Euler, 50 NFE)", ("decm/euler", 50), ("decm-no-n2n/euler", 50)),
    ("DE-CM", "N2N keeps few-step quality (CM, 1 NFE)", ("decm/cm", 1), ("decm-no-n2n/cm", 1)),
    ("Direct", "one step better than flow matching's 4 Euler steps", ("direct/one-step", 1), ("fm/euler", 4)),
    ("Direct", "one step better than its own v_theta's 4 Euler steps", ("direct/one-step", 1), ("direct/v-euler", 4)),
    ("Direct", "(not claimed) one step as good as 100 Euler steps", ("direct/one-step", 1), ("fm/euler", 100)),
    ("Direct", "stop-gradients better than none (Table 3)", ("direct/one-step", 1), ("direct-no-sg/one-step", 1)),
]


def curves_claims(report, k=None):
    """Each claim at budget k (default the largest): the FD of both sides (median [lowest, highest] over the
    seeds both sides have) and in how many of those seeds a beats b; "shows" when it does in every seed, "mixed"
    in some."""
    k = k or max(report["setting"]["budgets"])
    out = []
    for paper, claim, (ra, na), (rb, nb) in CLAIMS:
        seeds = [s for s in report["rows"].get(ra, {}).get(str(k), {})
                 if s in report["rows"].get(rb, {}).get(str(k), {})]
        if not seeds:
            continue
        fd = lambda row, n, s: report["rows"][row][str(k)][s][str(n)]["fd"]          # noqa: E731
        wins = sum(fd(ra, na, s) < fd(rb, nb, s) for s in seeds)
        verdict = "shows" if wins == len(seeds) else "does not show" if wins == 0 else "mixed"
        out.append(dict(paper=paper, claim=claim, a=band(report, ra, k, na, seeds), b=band(report, rb, k, nb, seeds),
                        wins=wins, seeds=len(seeds), verdict=verdict))
    return out


def claims_markdown(claims):
    def fmt(b):
        return f"{b[0]:.0f}" + (f" [{b[1]:.0f}, {b[2]:.0f}]" if b[3] > 1 else "")
    lines = ["| paper | claim | FD, a | FD, b | seeds where a beats b | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['paper']} | {c['claim']} | {fmt(c['a'])} | {fmt(c['b'])} | {c['wins']} of {c['seeds']} | "
              f"{c['verdict']} |" for c in claims]
    return "\n".join(lines)


# The lines of the compute figure, a panel per NFE: the few-step rows in colour, and for reference the multi-step
# rows at 100 steps (dashed) and flow matching at the panel's NFE (dotted).
CURVE_LINES = {"scm/sct": ("sCT", "tab:blue"), "scm/scd": ("sCD", "tab:cyan"),
               "gcm/cu-restart": ("GCM CU, restart", "tab:green"), "gcm/vu-pushforward": ("GCM VU, pushforward", "tab:olive"),
               "decm/cm": ("DE-CM, CM", "tab:red"), "decm/mix": ("DE-CM, Mix", "tab:orange"),
               "direct/one-step": ("Direct, one step", "tab:purple")}
CURVE_REFERENCES = {"fm/euler": ("flow matching, Euler", "0.35"), "scm/teacher-ode": ("TrigFlow teacher, ODE", "tab:brown"),
                    "direct/v-euler": ("Direct's v, Euler", "tab:pink")}


def curves_figure(report, path, nfes=(1, 2, 4)):
    """FD against training cost, a panel per NFE: a line per method and sampler (the median over seeds, and a
    band from the lowest to the highest seed), the multi-step baselines at 100 steps (dashed) and flow matching
    at the panel's NFE (dotted)."""
    import matplotlib.pyplot as plt           # no backend forced: a notebook's inline one stays (headless: Agg)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    budgets = report["setting"]["budgets"]
    fig, axes = plt.subplots(1, len(nfes), figsize=(5.2 * len(nfes), 4.8), sharey=True, squeeze=False)

    def draw(ax, row, nfe, label, colour, **style):
        points = [(row_cost(report, row, k), band(report, row, k, nfe)) for k in budgets]
        points = [(c, b) for c, b in points if b]
        if points:
            x = [c for c, _ in points]
            ax.plot(x, [b[0] for _, b in points], color=colour, label=label, **style)
            ax.fill_between(x, [b[1] for _, b in points], [b[2] for _, b in points], color=colour, alpha=0.15, lw=0)
    for ax, nfe in zip(axes[0], nfes):
        for row, (label, colour) in CURVE_LINES.items():
            if row in report["rows"]:
                draw(ax, row, nfe, label, colour, marker="o", ms=3)
        for row, (label, colour) in CURVE_REFERENCES.items():
            if row in report["rows"]:
                draw(ax, row, 100, f"{label}, 100 steps", colour, ls="--", lw=1)
        if nfe > 1 and "fm/euler" in report["rows"]:
            draw(ax, "fm/euler", nfe, "flow matching, Euler, the panel's NFE", "0.35", ls=":", lw=1.2)
        ax.set(xscale="log", yscale="log", title=f"{nfe} NFE", xlabel="training cost (flow-matching digits presets)")
        ax.xaxis.set_major_locator(FixedLocator([1, 2, 4, 8, 16, 32]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(FixedLocator([10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000]))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("digits FD (lower is better)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ==============================================================================================
# The target policies on a GPU (tests/gpu_check.sh): per method, what each policy costs and what it gets wrong

POLICY_METHODS = {"gcm-cu": "gcm/cu-fd-l2", "scm": "scm/scd", "decm-cd": "decm/cd+fm", "decm-n2n": "decm/cd+fm",
                  "direct": "direct/default"}
POLICY_RUNS = {"fp32": "bf16-exact", "tf32": "bf16-tf32", "bf16": "bf16-bf16"}    # tests/gpu_check.sh's JSON names
# The README's digits figure of each method's digits preset under --bf16 with the exact and the faster policy (FD
# at 1 NFE, one seed, on the CPU, where the tf32 policy is the exact one), from its precision table.
README_DIGITS_BF16 = {"gcm-cu": (227.0, 323.5), "scm": (245.7, 250.7), "decm-cd": (126.7, 130.3),
                      "direct": (428.0, 433.5)}
# A policy whose target errs by more than this at the closed-form solution (relative to the target's size, or,
# for the targets that vanish there, against their unit scale) is not a default: it changes the maths more than
# a training step's rounding does.
POLICY_TOLERANCE = 1e-3


def policy_errors(device):
    """{method: {policy: error}}: tests/test_precision.py's oracle target errors of every policy under --bf16 on
    `device` (a GPU with TF32 on outside the target passes, as a run there has it)."""
    import test_precision
    if device == "cuda":
        common.set_tf32(True)
    return {m: test_precision.policy_errors(m, device) for m in POLICY_METHODS}


def policy_report(folder):
    """Per method, a table of the three target policies: the step time of the method's update under --bf16 and
    its ratio to its reference, the oracle target error, the README's digits figures; and the default the
    figures support: the fastest policy whose target error is within POLICY_TOLERANCE."""
    def load(name):
        path = os.path.join(folder, name)
        return json.load(open(path)) if os.path.isfile(path) else {}
    errors, lines = load("policy-errors.json"), []
    steps = {p: load(f"step-cost-{run}.json").get("step_cost", {}) for p, run in POLICY_RUNS.items()}
    for method, entry in POLICY_METHODS.items():
        lines += [f"**{method}** ({entry})", "", "| policy | s / step | x its reference | oracle target error | "
                  "digits FD, 1 NFE (README, CPU) |", "|---|---|---|---|---|"]
        fastest = []
        for policy in POLICY_RUNS:
            row, err, digits = steps[policy].get(entry, {}), errors.get(method, {}).get(policy), README_DIGITS_BF16.get(method)
            timing = f"{row['sec']:.4f} | {row['ratio']:.2f}" if "sec" in row else "not measured | -"
            fd = "-" if not digits else f"{digits[policy == 'bf16']:.1f}" + (" (= exact on a CPU)" if policy == "tf32" else "")
            lines.append(f"| {policy} | {timing} | {'-' if err is None else f'{err:.1e}'} | {fd} |")
            if "sec" in row and err is not None and err <= POLICY_TOLERANCE:
                fastest.append((row["sec"], policy))
        choice = f"`{min(fastest)[1]}`" if fastest else "not decided (missing figures)"
        lines += ["", f"Default on this device for {method}: {choice} (the fastest policy whose target error at the "
                  f"solution is within {POLICY_TOLERANCE:g})", ""]
    return "\n".join(lines)


def free_memory(run):
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def time_block(name, spec, run, repeats, warmup):
    """Build entry `name` alone, run `warmup` untimed updates (compilation included), then time `repeats`
    updates. Returns (seconds per update, peak GB of this entry alone or None on the CPU); frees it after."""
    cuda = run.device.type == "cuda"
    run.guard = common.UpdateGuard(run.guard.kind)           # --guard snapshot: no copies of the last entry kept
    free_memory(run)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step = STEPS[name](spec, run)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else None
    del step
    free_memory(run)
    return times, peak


def count_flops(name, spec, run, at=4):
    """FLOPs of one update of `name` at spec.batch: counted (torch.utils.flop_counter: matmuls, convolutions,
    attention, in the forward, backward and JVP passes) on an eager build at batch `at`, and scaled, since
    every pass is per sample."""
    from torch.utils.flop_counter import FlopCounterMode
    small = SimpleNamespace(**{**vars(spec), "batch": min(at, spec.batch)})
    eager = common.Run({**run.cfg, "compile": False, "batch_size": small.batch})
    step = STEPS[name](small, eager)
    with FlopCounterMode(display=False) as counter:
        step()
    del step
    free_memory(run)
    return counter.get_total_flops() * spec.batch / small.batch


def measure(names, spec, repeats, warmup, run):
    """Table a: per reference (fm/plain, scm/diffusion), blocks R E1 R E2 R ... (see the module docstring)."""
    out = {}
    for ref in dict.fromkeys(REFERENCE[n] for n in names):
        entries = [n for n in names if REFERENCE[n] == ref and n != ref]
        ref_blocks, ref_peak = [], None

        def reference_block():
            nonlocal ref_peak
            times, ref_peak = time_block(ref, spec, run, repeats, warmup)
            ref_blocks.append(statistics.median(times))
        reference_block()
        for n in entries:
            try:
                times, peak = time_block(n, spec, run, repeats, warmup)
            except Skip as e:
                out[n] = {"skipped": str(e)}
                print(f"{n}: skipped ({e})", file=sys.stderr, flush=True)
                continue
            reference_block()
            sec = statistics.median(times)
            out[n] = {"sec": sec, "reference": ref, "ratio": sec / statistics.mean(ref_blocks[-2:]), "peak_gb": peak}
            if GOAL[n] is not None:
                out[n]["goal"] = GOAL[n]
            print(f"{n}: {sec:.4f} s/step, {out[n]['ratio']:.2f}x {ref}", file=sys.stderr, flush=True)
        out[ref] = {"sec": statistics.median(ref_blocks), "reference": ref, "ratio": 1.0, "peak_gb": ref_peak}
    for n, r in out.items():
        if "sec" in r:
            r["tflop"] = count_flops(n, spec, run) / 1e12
            r["tflops"] = r["tflop"] / r["sec"]
    return {n: out[n] for n in names if n in out}


PASSES = {"target pass: JVP": "JVPs", "target pass": "other target passes", "backward": "backward",
          "optimizer step": "optimizer step"}


def profile_block(name, spec, run, repeats, warmup):
    """Where `repeats` updates of `name` spend their time, by the record_function ranges common.py marks: the
    JVPs, the other target passes, the backward, the optimizer step, and the rest (the gradient passes'
    forwards, the loss algebra, the draws, the guard and the EMA), as shares of the whole: CPU time on the
    CPU, kernel time on CUDA."""
    from torch.profiler import ProfilerActivity, profile
    cuda = run.device.type == "cuda"
    run.guard = common.UpdateGuard(run.guard.kind)
    free_memory(run)
    step = STEPS[name](spec, run)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(repeats):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        total = sum(e.self_device_time_total for e in events) / 1e6
    else:
        total = time.perf_counter() - t0
    spent = {label: sum((e.device_time_total if cuda else e.cpu_time_total) for e in events if e.key == key) / 1e6
             for key, label in PASSES.items()}
    del step
    free_memory(run)
    shares = {label: s / total for label, s in spent.items()}
    shares["gradient forwards and the rest"] = 1 - sum(shares.values())
    return {"sec": total / repeats, "shares": shares}


def profile_table(res):
    labels = list(PASSES.values()) + ["gradient forwards and the rest"]
    rows = ["| method / variant | sec / step (profiled) | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels)]
    for n, r in res.items():
        if "skipped" in r:
            rows.append(f"| {n} | skipped: {r['skipped']} |" + " |" * len(labels))
        else:
            rows.append(f"| {n} | {r['sec']:.4f} | " + " | ".join(f"{100 * r['shares'][k]:.0f}%" for k in labels) + " |")
    return "\n".join(rows)


def device_peak(run, bf16, override=None):
    """The device's dense peak TFLOP/s for the precision of the gradient passes, or None where unknown."""
    if override:
        return override
    if run.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(run.device)
    keys = [k for k in PEAK_TFLOPS if k in name]
    return PEAK_TFLOPS[max(keys, key=len)][0 if bf16 else 1] if keys else None


def step_table(res, peak):
    head = "| method / variant | sec / step | x reference | goal | peak GB | TFLOP / step | TFLOP/s |" + \
           (" % of peak |" if peak else "")
    rows = [head, "|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    for n, r in res.items():
        if "skipped" in r:
            rows.append(f"| {n} | skipped: {r['skipped']} |  |  |  |  |  |" + (" |" if peak else ""))
            continue
        ref = "" if r["reference"] == n else f"{r['ratio']:.2f} ({r['reference']})"
        goal = f"<= {r['goal']} {'met' if r['ratio'] <= r['goal'] else 'NOT met'}" if "goal" in r else ""
        mem = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        rows.append(f"| {n} | {r['sec']:.4f} | {ref} | {goal} | {mem} | {r['tflop']:.3g} | {r['tflops']:.3g} |"
                    + (f" {100 * r['tflops'] / peak:.0f} |" if peak else ""))
    return "\n".join(rows)


def toy_table(dataset, steps, only, tmp, flags=()):
    """Table b: {row: {nfe: swd}}, each method trained by its own toy preset, then prior and floor."""
    rows, seconds = {}, {}
    for method, runner in TOYS.items():
        if only and method not in only:
            continue
        t0 = time.perf_counter()
        res = runner(dataset, os.path.join(tmp, "toy-" + method), steps, flags)
        seconds.update({r: time.perf_counter() - t0 for r in res})
        rows.update(res)
    n = TOY_EVAL_SAMPLES
    data = common.load_dataset(dataset)
    held_out = data.sample(n, generator=torch.Generator().manual_seed(10_000))[0]
    other = data.sample(n, generator=torch.Generator().manual_seed(20_000))[0]
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(30_000))
    rows["noise prior (0 NFE)"] = {0: common.sliced_wasserstein(noise, held_out)}
    rows["data vs data (floor)"] = {0: common.sliced_wasserstein(other, held_out)}
    return rows, seconds


def toy_markdown(rows, seconds):
    head = "| method / sampler | " + " | ".join(f"{k} NFE" for k in TOY_NFES) + " | train s |"
    lines = [head, "|---|" + "---|" * (len(TOY_NFES) + 1)]
    for name, scores in rows.items():
        if 0 in scores:                                 # prior and floor: one figure, spread over the row
            cells = [f"{scores[0]:.4f}"] + [""] * (len(TOY_NFES) - 1)
        else:
            cells = [f"{scores[k]:.4f}" if k in scores else "-" for k in TOY_NFES]
        t = f"{seconds[name]:.0f}" if name in seconds else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t} |")
    return "\n".join(lines)


def main(argv=None):
    p = common.OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, help="image channels (4: the papers' VAE latents)")
    p.add_argument("--repeats", type=int, default=15, help="timed updates per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates per block (compilation, autotuning)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the gradient passes (--bf16 of the scripts)")
    p.add_argument("--target-precision", default="fp32", choices=common.TARGET_PRECISIONS,
                   help="the target passes' policy (--target-precision of the scripts; bf16 needs --bf16)")
    p.add_argument("--no-tf32", action="store_true", help="IEEE fp32 also in the gradient passes on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the gradient passes (--compile)")
    p.add_argument("--guard", default="light", choices=common.UpdateGuard.KINDS, help="the update guard (--guard)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: PEAK_TFLOPS by name)")
    p.add_argument("--profile", action="store_true", help="instead of the timed blocks, where each update spends its "
                   "time (JVPs, other target passes, backward, optimizer step, the rest)")
    p.add_argument("--only", nargs="+", help="the entries to run, by name (STEPS, TOYS, DIGITS; a step's reference "
                   "runs with it); a table none of them belongs to is left out")
    p.add_argument("--policy-errors", action="store_true", help="instead of the tables: the oracle target error of "
                   "each target policy per method under --bf16 on --device (tests/test_precision.py), to --json")
    p.add_argument("--policy-report", metavar="DIR", help="instead of the tables: per method, the decision table of the "
                   "target policies from tests/gpu_check.sh's step-cost and policy-error JSON in DIR")
    p.add_argument("--json", help="also write the figures as JSON")
    p.add_argument("--toy-dataset", default="checkerboard", choices=common.TOY_SETS)
    p.add_argument("--toy-steps", type=int, help="shorten every toy run to this many steps (smoke test)")
    p.add_argument("--toy-flags", default="", help="extra flags for every toy run, e.g. '--eval-samples 512'")
    p.add_argument("--digits-steps", type=int, help="train every digits run this many steps (the presets: 1500)")
    p.add_argument("--digits-flags", default="", help="extra flags for every digits run, one string (smoke test: "
                   "--digits-flags='--eval-samples 32'; on a GPU: '--device cuda')")
    p.add_argument("--digits-data", help="data folder holding (or to hold) the digits classifier")
    p.add_argument("--digits-jobs", type=int, default=1, help="digits entries run at a time, each in its own process")
    p.add_argument("--digits-budget", type=float, help="with --digits-jobs: stop the entries still running after this "
                   "many seconds (the table holds the others)")
    p.add_argument("--curves", metavar="DIR", help="table d instead of a-c: train every chain of CHAINS for each seed "
                   "to the largest budget in DIR, score each budget's snapshot, then write the table (again: continue)")
    p.add_argument("--curve-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every chain")
    p.add_argument("--curve-budgets", type=int, nargs="+", default=list(CURVE_BUDGETS), help="budgets scored, in "
                   "multiples of the presets' 1500 steps (the runs train to the largest)")
    p.add_argument("--curve-chains", nargs="+", choices=list(CHAINS), default=list(CHAINS), help="chains to run")
    p.add_argument("--teacher-budget", type=int, help="the teacher snapshot students distil (default: the largest "
                   "budget)")
    p.add_argument("--curves-report-only", action="store_true", help="with --curves: only the table, JSON and figure "
                   "of what DIR holds")
    p.add_argument("--curve-unit-steps", type=int, default=1500, help="steps of one budget unit (the presets': 1500)")
    p.add_argument("--curve-eval-samples", type=int, default=1000, help="samples scored per budget, sampler and NFE")
    p.add_argument("--curve-jobs", type=int, default=2, help="processes at a time (one thread each)")
    p.add_argument("--digits-entry", help=argparse.SUPPRESS)          # one entry, rows to --json (--digits-jobs)
    p.add_argument("--skip", nargs="*", default=[], choices=["step-cost", "toy", "digits"], help="leave a table out")
    p.add_argument("--figure", help="draw the digits samples of every run into this PNG, the guided runs into "
                   "<name>-cfg.png (with --skip digits: from the runs already in --keep-runs)")
    p.add_argument("--keep-runs", help="write the training runs into this folder and keep them (notebooks/digits.ipynb "
                   "reads the digits runs from it with DIGITS_RUNS=DIR)")
    args = p.parse_args(argv)
    if args.target_precision == "bf16" and not args.bf16:
        p.error("--target-precision bf16 needs --bf16")
    if min(args.batch, args.size, args.channels, args.repeats) < 1 or args.warmup < 0:
        p.error("--batch, --size, --channels and --repeats must be >= 1, --warmup >= 0")
    unknown = [o for o in args.only or [] if o not in {**STEPS, **TOYS, **DIGITS}]
    if unknown:
        p.error(f"--only: no entry named {', '.join(unknown)} (steps: {', '.join(STEPS)}; toy: {', '.join(TOYS)}; "
                f"digits: {', '.join(DIGITS)})")
    import dit
    if args.model not in dit.DiT_models:
        p.error(f"--model {args.model}: not one of {', '.join(dit.DiT_models)}")
    if args.policy_errors:
        errors = policy_errors(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        print(json.dumps(errors, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(errors, f, indent=1)
        return
    if args.policy_report:
        print(policy_report(args.policy_report))
        return
    if args.curves:
        budgets = sorted(args.curve_budgets)
        cv = SimpleNamespace(root=os.path.abspath(args.curves), seeds=args.curve_seeds, budgets=budgets,
                             chains=args.curve_chains, teacher_budget=args.teacher_budget or budgets[-1],
                             unit=args.curve_unit_steps, eval_samples=args.curve_eval_samples,
                             flags=shlex.split(args.digits_flags),
                             data_path=os.path.abspath(args.digits_data or os.path.join(args.curves, "digits-data")))
        left = [] if args.curves_report_only else run_curves(cv, args.curve_jobs)
        cache = os.path.join(cv.root, "flops.json")                # counted once per folder (about a minute)
        flops = common.read_json(cache)
        if not set(cv.chains) | {"fm"} <= set(flops):
            flops = {**flops, **update_flops(cv.chains, cv.data_path)}
            common.write_json(cache, flops)
        report = curves_report(cv, flops)
        print(f"\nDigits FD along a compute axis: the median over seeds {cv.seeds} [lowest, highest]; costs in "
              f"flow-matching digits presets ({cv.unit} updates of batch 64); a row at budget k costs its teacher "
              f"plus k times its cost of 1x\n")
        print(curves_markdown(report))
        report["claims"] = curves_claims(report)
        print(f"\nThe papers' claims at {max(budgets)}x, seed by seed\n")
        print(claims_markdown(report["claims"]))
        if args.figure:
            curves_figure(report, args.figure)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        if left and not args.curves_report_only:
            sys.exit(1)
        return
    if args.digits_entry:                           # a process of --digits-jobs: one entry, its rows as JSON
        rows, seconds = digits_entry(args.digits_entry, args.keep_runs, args.digits_steps,
                                     shlex.split(args.digits_flags), args.digits_data)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": seconds}, f)
        return
    chosen = [n for n in STEPS if not args.only or n in args.only]
    names = [n for n in STEPS if n in chosen or any(REFERENCE[c] == n for c in chosen)]
    for table, entries in (("step-cost", chosen), ("toy", [m for m in TOYS if m in (args.only or TOYS)]),
                           ("digits", digits_entries(args.only))):
        if not entries and table not in args.skip:               # --only names nothing of this table
            args.skip.append(table)
    figures = {"setting": vars(args)}
    if args.keep_runs:
        os.makedirs(args.keep_runs, exist_ok=True)
    with (contextlib.nullcontext(args.keep_runs) if args.keep_runs else tempfile.TemporaryDirectory()) as tmp:
        if "step-cost" not in args.skip:
            cfg = {**common.COMMON_DEFAULTS, "method": "benchmark", "dataset": "cifar10", "out": tmp,
                   "batch_size": args.batch, "device": args.device, "bf16": args.bf16, "tf32": not args.no_tf32,
                   "target_precision": args.target_precision, "compile": args.compile, "guard": args.guard}
            run = common.Run(cfg)
            torch.manual_seed(0)
            spec = SimpleNamespace(model=args.model, batch=args.batch, size=args.size, channels=args.channels)
            cuda = run.device.type == "cuda"
            device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
            figures["setting"]["device_name"] = device
            targets = {"fp32": "IEEE fp32", "tf32": "fp32 with TF32" if cuda else "IEEE fp32 (tf32 on a CPU)",
                       "bf16": "bf16"}[args.target_precision]
            policy = (f"bf16 autocast, target passes {targets}" if args.bf16 else
                      f"fp32{'' if args.no_tf32 or not cuda else ' with TF32'}, target passes {targets}")
            setting = (f"{args.model} at {args.size}x{args.size}x{args.channels}, batch {args.batch}, {device}; {policy}"
                       f"{', compiled' if args.compile else ''}, guard {args.guard}")
            if args.profile:
                res = {}
                for n in names:
                    try:
                        res[n] = profile_block(n, spec, run, args.repeats, args.warmup)
                    except Skip as e:
                        res[n] = {"skipped": str(e)}
                figures["profile"] = res
                print(f"\nWhere an update's time goes: {setting}; {args.repeats} profiled updates after {args.warmup} "
                      f"warm-up ones\n")
                print(profile_table(res))
            else:
                res = measure(names, spec, args.repeats, args.warmup, run)
                peak = device_peak(run, args.bf16, args.peak_tflops)
                figures["step_cost"], figures["setting"]["peak_tflops"] = res, peak
                print(f"\nTraining-step cost: {setting}; blocks of {args.repeats} updates after {args.warmup} warm-up "
                      f"ones, median seconds, ratio to the reference's blocks around it"
                      f"{f'; peak {peak:g} TFLOP/s' if peak else ''}\n")
                print(step_table(res, peak))
        if "toy" not in args.skip:
            torch.manual_seed(0)
            rows, seconds = toy_table(args.toy_dataset, args.toy_steps, args.only, tmp, shlex.split(args.toy_flags))
            figures["toy"] = {f"{r}/nfe{k}": v for r, scores in rows.items() if "/" in r for k, v in scores.items()}
            figures["toy"]["prior"] = rows["noise prior (0 NFE)"][0]
            figures["toy"]["floor"] = rows["data vs data (floor)"][0]
            print(f"\nSample quality on {args.toy_dataset}: sliced Wasserstein distance to "
                  f"{TOY_EVAL_SAMPLES} held-out points (lower is better), each method's "
                  f"toy preset{f', {args.toy_steps} steps' if args.toy_steps else ''}\n")
            print(toy_markdown(rows, seconds))
        if "digits" not in args.skip:
            torch.manual_seed(0)
            rows, seconds, accuracy = digits_table(args.digits_steps, args.only, tmp, shlex.split(args.digits_flags),
                                                   args.digits_data, args.digits_jobs, args.digits_budget)
            figures["digits"] = {f"{r}/nfe{k}": v for r, scores in rows.items() if "/" in r for k, v in scores.items()}
            figures["digits"]["floor"] = rows["held-out vs training digits (floor)"][0]
            figures["digits"]["ceiling"] = rows["Gaussian noise (ceiling)"][0]
            figures["digits"]["seconds"] = seconds
            figures["digits"]["classifier_accuracy"] = accuracy
            print(f"\nSample quality on digits (8x8, DiT-T/2): Frechet distance to the 360 held-out digits in the "
                  f"features of a classifier with {100 * accuracy:.1f}% held-out accuracy, and in brackets the "
                  f"effective number of classes of the samples (10 = all digits equally often); lower FD is "
                  f"better{f', {args.digits_steps} steps' if args.digits_steps else ''}\n")
            print(digits_markdown(rows, seconds))
            if "fm/euler" in rows:
                goals = digits_goals(rows)
                figures["digits_goals"] = goals
                print(f"\nGoals (FM baseline at 100 Euler steps: {goals['fm100']:.1f}; ceiling {goals['ceiling']:.1f}):")
                for name, g in goals["methods"].items():
                    print(f"- {name}: best FD at 1-2 NFE {g['best_1_2']:.1f}, within 2x of {g['baseline']} at 100 "
                          f"NFE ({g['baseline_fd']:.1f}): "
                          f"{'met' if g['within_2x_baseline'] else 'NOT met'}; 1 NFE below a quarter of the ceiling: "
                          f"{'met' if g['below_quarter_ceiling_1nfe'] else 'NOT met'}")
                for claim, holds in goals["claims"].items():
                    print(f"- {claim}: {'shows' if holds else 'does not show'}")
        if args.figure:
            digits_figure(tmp, args.figure)
            if os.path.isdir(os.path.join(tmp, "digits-cfg")):
                stem, ext = os.path.splitext(args.figure)
                digits_figure(tmp, f"{stem}-cfg{ext or '.png'}", DIGITS_FIGURE_CFG)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    common.cli(main)
