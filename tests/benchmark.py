"""Side-by-side figures for the README (not a test: run it by hand).

    python tests/benchmark.py                         # CPU default: DiT-S/2 at 32x32, batch 8
    python tests/benchmark.py --model DiT-B/2 --batch 64 --device cuda --bf16 --json bench.json

Table a, training-step cost: one full update of each method (and its variants) against a plain
flow-matching update of the same backbone, batch and device. Steps are interleaved round-robin so
that machine drift hits every variant alike; the table gives the median seconds per step and the
median over rounds of the per-round ratio to flow matching (and the peak-memory ratio on CUDA). An
entry whose issue sets its goal against another step (sCM: its own diffusion step) also gets the ratio
to that reference, and every goal is printed as met or not met.

Every entry of STEPS builds its update from the method file's own loss functions:
    @step_cost("<method>/<variant>", reference="fm/plain", goal=None)
    def builder(model_name, batch, size, run) -> step()                                (one update)

Table b, sample quality on a 2D toy set: every entry of TOYS trains its method with the method's
own toy preset through the script's `main` (in this process) and returns the sliced Wasserstein
distances its run wrote to eval.json, per sampler and NFE:
    TOYS["<method>"] = runner(dataset, out, steps) -> {"<method>/<sampler>": {nfe: swd}}
steps=None keeps the preset's length (--toy-steps shortens every run for a smoke test). The table adds
the noise prior and the data-vs-data floor (two independent held-out sets of the same size).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402

STEPS = {}
REFERENCE = {}          # the step each entry's goal is measured against (fm/plain unless said otherwise)
GOAL = {}               # the step-cost goal from the method's issue, as a ratio to its reference
TOYS = {}
TOY_NFES = (1, 2, 4, 100)


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


def run_eval(main, argv, dataset, out, steps):
    """Train with a method script's own main on the toy preset and return its eval.json."""
    argv = ["--dataset", dataset, "--out", out, "--log-every", "1000000", *argv]
    main(argv + (["--steps", str(steps)] if steps else []))
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def nfe_scores(scores):
    return {int(k): v for k, v in scores.items()}


class ImageShape:
    """A stand-in data set for building backbones: shape and number of classes only."""
    kind = "image"

    def __init__(self, size, channels=3, num_classes=10):
        self.shape, self.num_classes = (channels, size, size), num_classes


def backbone(model_name, size, **kw):
    return common.build_backbone({"model": model_name}, ImageShape(size), **kw)


def batch_of(batch, size, device):
    return torch.randn(batch, 3, size, size, device=device)


@step_cost("fm/plain")
def fm_step(model_name, batch, size, run):
    """The reference: flow matching, x_t = (1-t) z + t x, one forward-backward, AdamW."""
    net = backbone(model_name, size).to(run.device)
    opt = common.make_optimizer("adamw", net.parameters(), 1e-4)
    x = batch_of(batch, size, run.device)

    def step():
        z, t = torch.randn_like(x), torch.rand(len(x), device=x.device)
        x_t, v = common.NoiseAt0()(x, z, t)
        with run.autocast():
            loss = (net(x_t, t) - v).float().pow(2).mean()
        run.update(opt, loss, net.parameters())
    return step


@step_cost("direct/default", goal=2.8)
def direct_step(model_name, batch, size, run):
    """Direct Models, Alg. 1: CFM forward-backward, two forwards without gradient, w forward-backward."""
    import direct
    cfg = {**direct.DEFAULTS, "param": "tw", "stop_grad": True}
    v, w = backbone(model_name, size).to(run.device), backbone(model_name, size).to(run.device)
    params = list(v.parameters()) + list(w.parameters())
    opt = common.make_optimizer("adamw", params, 1e-4)
    x = batch_of(batch, size, run.device)

    def step():
        with run.autocast():
            loss = direct.direct_losses(v, w, x, None, cfg)["loss"]
        run.update(opt, loss, params)
    return step


def decm_setup(model_name, batch, size, run, losses):
    """A DE-CM student (two times) and its frozen one-time teacher, unconditional, the defaults of decm.py."""
    import decm
    cfg = {**decm.DEFAULTS, **decm.ROLE_DEFAULTS["student"], "losses": losses}
    student = backbone(model_name, size, two_times=True, time_scale=cfg["time_scale"]).to(run.device)
    teacher = backbone(model_name, size, time_scale=cfg["time_scale"]).to(run.device).eval().requires_grad_(False)
    opt = common.make_optimizer("adamw", student.parameters(), 1e-4)

    def velocity(x, t, y):
        return teacher(x, t, y=y)
    return decm, cfg, student, opt, velocity, batch_of(batch, size, run.device)


@step_cost("decm/cd+fm", goal=3.6)
def decm_cd_fm_step(model_name, batch, size, run):
    """DE-CM Alg. 1 l.2-15: one teacher forward without gradient, one JVP (no graph), one forward-backward
    over F(z_t, t, 1) and F(z_t, t, t) batched."""
    decm, cfg, student, opt, velocity, x = decm_setup(model_name, batch, size, run, ["fm", "cd"])

    def step():
        with run.autocast():
            b = decm.prepare(x, None, velocity, cfg, False)
            loss = decm.cd_fm_loss(student, b, None, cfg)["loss"]
        run.update(opt, loss, student.parameters())
    return step


@step_cost("decm/n2n+fm")
def decm_n2n_fm_step(model_name, batch, size, run):
    """DE-CM Alg. 1 l.17-28: the teacher at z_t and z_r (one batched forward; in training it is shared with
    that iteration's CD+FM update), one JVP, the teacher at f(z_r, r, t) for v_psi, one forward-backward
    over F(z_r, r, t) and F(z_t, t, t) batched."""
    decm, cfg, student, opt, velocity, x = decm_setup(model_name, batch, size, run, ["fm", "cd", "n2n"])

    def step():
        with run.autocast():
            b = decm.prepare(x, None, velocity, cfg, True)
            loss = decm.n2n_fm_loss(student, velocity, b, None, cfg)["loss"]
        run.update(opt, loss, student.parameters())
    return step


@toy_quality("direct")
def direct_toy(dataset, out, steps):
    """The one-step direct map, and its jointly trained v_theta (pure CFM, Eq. 15) with the Euler sampler:
    the flow-matching baseline at 1, 4 and 100 steps."""
    import direct
    ev = run_eval(direct.main, ["--euler-steps", "1", "4", "100"], dataset, out, steps)
    return {"direct/one-step": nfe_scores(ev["swd"]), "fm/euler": nfe_scores(ev["swd_euler"])}


def gcm_step(flags):
    """A GCM update (CU unless flags say otherwise) with the paper's RAdam, built from gcm.gcm_losses."""
    def build(model_name, batch, size, run):
        import gcm
        cfg = gcm.parse_config(["--dataset", "cifar10", "--out", run.out, "--batch-size", str(batch),
                                "--model", model_name, "--dropout", "0"] + flags)
        net = gcm.build_model(cfg, ImageShape(size)).to(run.device)
        opt = common.make_optimizer(cfg["optimizer"], net.parameters(), cfg["lr"], betas=tuple(cfg["betas"]))
        x = batch_of(batch, size, run.device)

        def step():
            with run.autocast():
                loss = gcm.gcm_losses(net, x, None, cfg, cfg["eps"])["loss"]
            run.update(opt, loss, net.parameters())
        return step
    return build


def scm_step(mode, **flags):
    """sCM, Alg. 1, built from scm.py's own functions on the backbone of its image presets (adaptive double
    normalisation, c_noise(t) = t at time scale 1), with the same AdamW as fm/plain so the ratio measures
    the method, not the optimizer. sCT: one JVP (no graph) + one forward-backward; sCD adds the teacher's
    forward (two batched branches with CFG)."""
    def build(model_name, batch, size, run):
        import scm
        cfg = {**scm.DEFAULTS, "mode": mode, "class_cond": "cfg_max" in flags, "warmup_iters": 100, **flags}
        kw = dict(time_scale=cfg["time_scale"], adanorm=cfg["adanorm"])
        if cfg["class_cond"]:
            kw.update(num_classes=10)
        net = backbone(model_name, size, extra_cond=scm.guided(cfg), **kw).to(run.device)
        weight = scm.AdaptiveWeight(cfg["sigma_d"]).to(run.device)
        params = list(net.parameters()) + list(weight.parameters())
        opt = common.make_optimizer("adamw", params, 1e-4)
        x = batch_of(batch, size, run.device)
        y = torch.randint(0, 10, (batch,), device=run.device) if cfg["class_cond"] else None
        teacher = None
        if mode == "scd":
            teacher = backbone(model_name, size, class_dropout=0.1, **kw).to(run.device).eval().requires_grad_(False)

        def step():
            with run.autocast():
                if mode == "diffusion":
                    loss = scm.teacher_losses(net, x, y, cfg)["loss"]
                else:
                    loss = scm.scm_losses(net, weight, x, y, 50, cfg, teacher)["loss"]
            run.update(opt, loss, params)
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
    def runner(dataset, out, steps):
        import gcm
        ev = run_eval(gcm.main, ["--variant", variant, "--nfe", "1", "2", "4"], dataset, out, steps)
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
def scm_toy(dataset, out, steps):
    """scm.py's own toy preset: sCT and sCD (Alg. 1 with every stabiliser) with the consistency sampler of
    Section 5.2 at 1, 2 and 4 f evaluations (intermediate times 1.1 for 2 steps; 1.1, 0.73, 0.37 for 4), and
    the sCD teacher (Eq. 4) with its PF-ODE sampler (Eq. 3, DDIM steps) at 1, 2, 4 and 100 steps."""
    import scm
    sct = run_eval(scm.main, ["--mode", "sct", "--nfe", "1", "2", "4"], dataset, os.path.join(out, "sct"),
                   steps)
    teacher = run_eval(scm.main, ["--mode", "diffusion", "--nfe", "1", "2", "4", "100"], dataset,
                       os.path.join(out, "teacher"), steps)
    scd = run_eval(scm.main, ["--mode", "scd", "--teacher", os.path.join(out, "teacher", "ckpt.pt"), "--nfe", "1", "2",
                              "4"], dataset, os.path.join(out, "scd"), steps)
    return {"scm/sct": nfe_scores(sct["swd"]), "scm/scd": nfe_scores(scd["swd"]),
            "scm/teacher-ode": nfe_scores(teacher["swd"])}


@toy_quality("decm")
def decm_toy(dataset, out, steps):
    """DE-CM with its toy preset: `decm.py --dataset D` trains the FM teacher into OUT/teacher, then the
    student (fm,cd,n2n); the CM, Mix and Euler samplers of Table 4 at 1, 2, 4 NFE, and the teacher's Euler.
    1500 teacher + 1200 student steps (the preset's 2000 + 2000 would take over 3 minutes on 2 cores; the
    notebook shows 1000 student steps already near the floor)."""
    import decm
    teacher_steps = ["--teacher-steps", str(steps or 1500)]
    ev = run_eval(decm.main, ["--samplers", "cm", "mix", "euler", "--nfe", "1", "2", "4", *teacher_steps],
                  dataset, out, steps or 1200)
    with open(os.path.join(out, "teacher", "eval.json")) as f:
        teacher = json.load(f)
    rows = {f"decm/{s}": nfe_scores(ev[f"swd_{s}"]) for s in ("cm", "mix", "euler")}
    return {**rows, "decm/FM-teacher-euler": nfe_scores(teacher["swd"])}


def measure(names, model_name, batch, size, repeats, warmup, run):
    steps = {n: STEPS[n](model_name, batch, size, run) for n in names}
    cuda = run.device.type == "cuda"
    times, peaks = {n: [] for n in names}, {}
    for n in names:                                     # warm-up (and peak memory) one variant at a time
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(warmup):
            steps[n]()
        if cuda:
            torch.cuda.synchronize()
            peaks[n] = torch.cuda.max_memory_allocated()
        print(f"warm-up {n}: {(time.perf_counter() - t0) / max(warmup, 1):.3f} s/step", file=sys.stderr, flush=True)
    for _ in range(repeats):                            # interleaved: drift cancels in the ratios
        for n in names:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[n]()
            if cuda:
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        # The ratio is the median over rounds of this round's time over the reference's time in the same
        # round: the two ran seconds apart, so drift (and a noisy neighbour) cancels round by round.
        ref = REFERENCE[n]
        out[n] = {"sec": statistics.median(times[n]),
                  "ratio": statistics.median(a / b for a, b in zip(times[n], times["fm/plain"]))}
        if ref != "fm/plain":
            out[n].update(reference=ref, ref_ratio=statistics.median(a / b for a, b in zip(times[n], times[ref])))
        if GOAL[n] is not None:
            out[n]["goal"] = GOAL[n]
        if cuda:
            out[n]["mem_ratio"] = peaks[n] / peaks["fm/plain"]
    return out


def step_table(res, cuda):
    head = "| method / variant | sec / step | x flow matching | x reference | goal |" + (" peak memory x FM |" if cuda else "")
    rows = [head, "|---|---|---|---|---|" + ("---|" if cuda else "")]
    for n, r in res.items():
        ref = f"{r['ref_ratio']:.2f} ({r['reference']})" if "reference" in r else ""
        goal = ""
        if "goal" in r:
            got = r.get("ref_ratio", r["ratio"])
            goal = f"<= {r['goal']} {'met' if got <= r['goal'] else 'NOT met'}"
        rows.append(f"| {n} | {r['sec']:.4f} | {r['ratio']:.2f} | {ref} | {goal} |"
                    + (f" {r['mem_ratio']:.2f} |" if cuda else ""))
    return "\n".join(rows)


def toy_table(dataset, steps, only, tmp):
    """Table b: {row: {nfe: swd}}, each method trained by its own toy preset, then prior and floor."""
    rows, seconds = {}, {}
    for method, runner in TOYS.items():
        if only and not any(o in method for o in only):
            continue
        t0 = time.perf_counter()
        res = runner(dataset, os.path.join(tmp, "toy-" + method), steps)
        seconds.update({r: time.perf_counter() - t0 for r in res})
        rows.update(res)
    n = common.COMMON_DEFAULTS["eval_samples"]
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast where the method allows (CUDA)")
    p.add_argument("--only", nargs="*", help="substrings of the step names to run (fm/plain and the entries' "
                   "references always run)")
    p.add_argument("--json", help="also write the figures as JSON")
    p.add_argument("--toy-dataset", default="checkerboard", choices=common.TOY_SETS)
    p.add_argument("--toy-steps", type=int, help="shorten every toy run to this many steps (smoke test)")
    p.add_argument("--skip", nargs="*", default=[], choices=["step-cost", "toy"], help="leave a table out")
    args = p.parse_args(argv)
    chosen = [n for n in STEPS if not args.only or any(s in n for s in args.only)]
    names = [n for n in STEPS if n == "fm/plain" or n in chosen or any(REFERENCE[c] == n for c in chosen)]
    figures = {"setting": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if "step-cost" not in args.skip:
            cfg = {**common.COMMON_DEFAULTS, "method": "benchmark", "dataset": "cifar10", "out": tmp,
                   "batch_size": args.batch, "device": args.device, "bf16": args.bf16}
            run = common.Run(cfg)
            torch.manual_seed(0)
            res = measure(names, args.model, args.batch, args.size, args.repeats, args.warmup, run)
            cuda = run.device.type == "cuda"
            device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
            figures["step_cost"], figures["setting"]["device_name"] = res, device
            print(f"\nTraining-step cost: {args.model} at {args.size}x{args.size}, batch {args.batch}, {device}"
                  f"{', bf16 autocast' if args.bf16 else ''}; {args.repeats} interleaved rounds: median seconds, "
                  f"median per-round ratio\n")
            print(step_table(res, cuda))
        if "toy" not in args.skip:
            torch.manual_seed(0)
            rows, seconds = toy_table(args.toy_dataset, args.toy_steps, args.only, tmp)
            figures["toy"] = {f"{r}/nfe{k}": v for r, scores in rows.items() if "/" in r for k, v in scores.items()}
            figures["toy"]["prior"] = rows["noise prior (0 NFE)"][0]
            figures["toy"]["floor"] = rows["data vs data (floor)"][0]
            print(f"\nSample quality on {args.toy_dataset}: sliced Wasserstein distance to "
                  f"{common.COMMON_DEFAULTS['eval_samples']} held-out points (lower is better), each method's "
                  f"toy preset{f', {args.toy_steps} steps' if args.toy_steps else ''}\n")
            print(toy_markdown(rows, seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
