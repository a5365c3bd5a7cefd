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


step_cost("scm/diffusion")(scm_step("diffusion"))
step_cost("scm/sct")(scm_step("sct"))
step_cost("scm/scd")(scm_step("scd"))
step_cost("scm/scd-cfg")(scm_step("scd", cfg_max=2.0))
step_cost("scm/sct-discrete")(scm_step("sct", discrete_steps=18))

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
