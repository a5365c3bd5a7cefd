"""Side-by-side figures for the README (not a test: run it by hand).

    python tests/benchmark.py                         # CPU default: DiT-S/2 at 32x32, batch 8
    python tests/benchmark.py --model DiT-B/2 --batch 64 --device cuda --bf16 --json bench.json

Table a, training-step cost: one full update of each method (and its variants) against a plain
flow-matching update of the same backbone, batch and device. Steps are interleaved round-robin so
that machine drift hits every variant alike; the table gives the median seconds per step and the
ratio of medians to flow matching (and the peak-memory ratio on CUDA).

Every entry of STEPS builds its update from the method file's own loss functions:
    STEPS["<method>/<variant>"] = builder(model_name, batch, size, run) -> step()   (one update)
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


def step_cost(name):
    def register(fn):
        STEPS[name] = fn
        return fn
    return register


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


@step_cost("direct/default")
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


@step_cost("decm/cd+fm")
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

def measure(names, model_name, batch, size, repeats, warmup, run):
    steps = {n: STEPS[n](model_name, batch, size, run) for n in names}
    cuda = run.device.type == "cuda"
    times, peaks = {n: [] for n in names}, {}
    for n in names:                                     # warm-up (and peak memory) one variant at a time
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            steps[n]()
        if cuda:
            torch.cuda.synchronize()
            peaks[n] = torch.cuda.max_memory_allocated()
    for _ in range(repeats):                            # interleaved: drift cancels in the ratios
        for n in names:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[n]()
            if cuda:
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["fm/plain"])
    out = {}
    for n in names:
        sec = statistics.median(times[n])
        out[n] = {"sec": sec, "ratio": sec / base}
        if cuda:
            out[n]["mem_ratio"] = peaks[n] / peaks["fm/plain"]
    return out


def step_table(res, cuda):
    head = "| method / variant | sec / step | x flow matching |" + (" peak memory x FM |" if cuda else "")
    rows = [head, "|---|---|---|" + ("---|" if cuda else "")]
    for n, r in res.items():
        rows.append(f"| {n} | {r['sec']:.4f} | {r['ratio']:.2f} |" + (f" {r['mem_ratio']:.2f} |" if cuda else ""))
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast where the method allows (CUDA)")
    p.add_argument("--only", nargs="*", help="substrings of the step names to run (fm/plain always runs)")
    p.add_argument("--json", help="also write the figures as JSON")
    args = p.parse_args(argv)
    names = [n for n in STEPS if n == "fm/plain" or not args.only or any(s in n for s in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**common.COMMON_DEFAULTS, "method": "benchmark", "dataset": "cifar10", "out": tmp,
               "batch_size": args.batch, "device": args.device, "bf16": args.bf16}
        run = common.Run(cfg)
        torch.manual_seed(0)
        res = measure(names, args.model, args.batch, args.size, args.repeats, args.warmup, run)
    device = torch.cuda.get_device_name() if run.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nTraining-step cost: {args.model} at {args.size}x{args.size}, batch {args.batch}, {device}"
          f"{', bf16 autocast' if args.bf16 else ''}; median of {args.repeats} interleaved steps\n")
    print(step_table(res, run.device.type == "cuda"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"step_cost": res, "setting": vars(args) | {"device_name": device}}, f, indent=1)


if __name__ == "__main__":
    main()
