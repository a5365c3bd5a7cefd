"""One training update of a method under `torchrun --nproc_per_node 2` (gloo, CPU), checked against
the definition of data-parallel SGD: after the step the parameters are identical on both ranks and
equal to p0 - lr * mean_r(grad_r), where grad_r is the gradient of rank r's loss on its own batch,
recomputed here on an unwrapped copy with the same random draws. A JVP or any pass that bypassed
DDP's gradient synchronisation would break the equality. Then gradient accumulation: the same update with
two micro-batches per rank (--batch-gpu 4, DDP's sync on the last only) equals it, dropout off.

    torchrun --nproc_per_node 2 tests/ddp_step.py METHOD VARIANT[,VARIANT...] OUT

Each adapter returns (cfg, nets, make_batch, loss_fn): nets are the unwrapped networks that receive
gradients, make_batch() draws the step's per-sample randomness with the method's own `draw`/`prepare`, and
loss_fn(models, batch) is the method's loss on a (micro-)batch."""
import copy
import gc
import json
import os
import sys

import torch
import torch.distributed as tdist

import common

ADAPTERS = {}


def adapter(name):
    def register(fn):
        ADAPTERS[name] = fn
        return fn
    return register


def toy_batch(data, rank, device, n=8):
    x, y = data.sample(n, generator=torch.Generator().manual_seed(100 + rank))
    return x.to(device), y.to(device)


@adapter("direct")
def direct_adapter(variant, out, rank, nodrop, device):
    import direct
    args = ["--dataset", "moons", "--out", out, "--batch-size", "16", "--class-cond"]
    if variant == "no-stop-grad":
        args.append("--no-stop-grad")
    if variant == "cfg":
        args += ["--cfg-scale", "1.5", "--class-dropout", "0" if nodrop else "0.2"]
    cfg = direct.parse_config(args)
    data = common.load_dataset("moons")
    v, w = direct.build_models(cfg, data)
    x1, y = toy_batch(data, rank, device)
    return (cfg, [v, w], lambda: direct.draw(x1, y, cfg),
            lambda models, b: direct.direct_losses(*models, b, cfg))


@adapter("gcm")
def gcm_adapter(variant, out, rank, nodrop, device):
    """cu-l2: Eq. (39) with dropout (one mask for both passes); vu-mmd: VU with the time-aware MMD
    (Eq. 46); analytic: Eq. (6), the JVP on the module inside DDP; imm: shared-time MMD (Table 7i)."""
    import gcm
    drop = ["--dropout", "0" if nodrop else "0.2"]
    flags = {"cu-l2": ["--mmd-group", "1"] + drop, "vu-mmd": ["--variant", "vu"],
             "analytic": ["--mmd-group", "1", "--jvp", "analytic"] + drop,
             "imm": ["--mmd-share-time", "--mmd-sigma", "inf"]}[variant]
    cfg = gcm.parse_config(["--dataset", "moons", "--out", out, "--batch-size", "16"] + flags)
    data = common.load_dataset("moons")
    net = gcm.build_model(cfg, data)
    x, _ = toy_batch(data, rank, device)
    return cfg, [net], lambda: gcm.draw(x, None, cfg), lambda models, b: gcm.gcm_losses(models[0], b, cfg, cfg["eps"])


@adapter("scm")
def scm_adapter(variant, out, rank, nodrop, device):
    """sCT / sCD (with guidance) / discrete-time sCT: nets are F_theta and w_phi, both DDP-wrapped; the JVP
    inside scm.scm_losses runs on the unwrapped F_theta. The teacher is a frozen random network."""
    import scm
    args = ["--dataset", "moons", "--out", out, "--batch-size", "16", "--warmup-iters", "10",
            "--dropout", "0" if nodrop else "0.1"]
    args += {"sct": ["--mode", "sct"], "discrete": ["--mode", "sct", "--discrete-steps", "8"],
             "scd-cfg": ["--mode", "scd", "--teacher", "unused", "--init", "none", "--class-cond", "--cfg-max", "2"],
             }[variant]
    cfg = scm.parse_config(args)
    data = common.load_dataset("moons")
    cfg["data_shape"] = list(data.shape)
    net, weight = scm.build_net(cfg, data), scm.AdaptiveWeight(cfg["sigma_d"])
    teacher = None
    if cfg["mode"] == "scd":
        teacher = scm.build_net({**cfg, "mode": "diffusion", "cfg_max": 1.0, "class_dropout": 0.1}, data)
        torch.nn.init.normal_(teacher.out.weight, std=0.3)
        teacher.eval().requires_grad_(False).to(device)
    x0, y = toy_batch(data, rank, device)
    y = y if cfg["class_cond"] else None
    return (cfg, [net, weight], lambda: scm.draw(x0, y, cfg),
            lambda models, b: scm.scm_losses(*models, b, 5, cfg, teacher))


@adapter("decm")
def decm_adapter(variant, out, rank, nodrop, device):
    """DE-CM's two updates, each on its own: CD+FM (Alg. 1 l.8-15) and N2N+FM (l.17-28), with a
    random teacher (unguided, or CFG with velocity normalization), from scratch, and the FM teacher."""
    import decm
    cond = variant.startswith("cfg")
    args = ["--dataset", "moons", "--out", out, "--batch-size", "16", "--teacher-steps", "0"]
    args += ["--class-cond"] if cond else []
    args += ["--losses", "fm", "--class-dropout", "0" if nodrop else "0.1"] if variant == "teacher" else []
    cfg = decm.parse_config(args)
    data = common.load_dataset("moons")
    x, y = toy_batch(data, rank, device)
    y = y if cond else None
    if variant == "teacher":
        net = decm.build_net(cfg, data, "teacher")
        return (cfg, [net], lambda: decm.prepare(x, y, None, cfg, False),
                lambda models, b: decm.teacher_loss(models[0], b, b["y"], cfg))
    student, velocity = decm.build_net(cfg, data, "student"), None
    if not variant.startswith("scratch"):
        cfg["w_cfg"] = 1.5 if cond else 1.0
        teacher = decm.build_net(cfg, data, "teacher").eval().requires_grad_(False)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.1 * torch.randn_like(p))
        teacher.to(device)

        def velocity(x_, t_, y_):
            return decm.guided_velocity(teacher, x_, t_, y_, cfg["w_cfg"], 0.5, cfg["velocity_norm"])
    n2n = variant.endswith("n2n-fm")

    def loss_fn(models, b):
        if n2n:
            return decm.n2n_fm_loss(models[0], velocity, b, b["y"], cfg)
        return decm.cd_fm_loss(models[0], b, b["y"], cfg)
    return cfg, [student], lambda: decm.prepare(x, y, velocity, cfg, n2n), loss_fn


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def main(method, variants, out):
    for variant in variants.split(","):
        check(method, variant, out)
    gc.collect()                        # free the DDP wrappers (and their reducers) while the group still exists
    tdist.barrier()
    tdist.destroy_process_group()
    # Once, under a loaded machine, a rank aborted after this point ("terminate called without an active
    # exception", a C++ destructor at interpreter shutdown) after writing its results. Leave without the
    # shutdown's destructors: every result this check needs is on disk already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build(method, variant, out, rank, nodrop, device="cpu"):
    """cfg, the networks (on `device`), this rank's batch of draws and the loss of a method variant. The cfg
    pins the device and turns TF32 off: the checks compare updates at fp32 accuracy."""
    torch.manual_seed(0)                                           # identical initial weights on every rank
    cfg, nets, make_batch, loss_fn = ADAPTERS[method](variant, out, rank, nodrop, device)
    with torch.no_grad():                       # leave the zero-initialised start, so every path has a gradient
        for n in nets:
            for p in n.parameters():
                p.add_(0.05 * torch.randn_like(p))
            n.to(device)
    torch.manual_seed(1000 + rank)                                 # per-rank random draws of the step
    if device != "cpu":
        torch.cuda.manual_seed(1000 + rank)
    return {**cfg, "device": device, "tf32": False}, nets, make_batch(), loss_fn


def sgd_update(cfg, nets, batch, loss_fn, batch_gpu=None, lr=0.1):
    """One common.Run.update (DDP-wrapped nets, SGD) from the RNG state at the call (Run's seeding is undone,
    so the dropout masks are those a reference pass from the same state draws); returns (p0, p1, losses)."""
    rng = common.rng_state(cfg["device"])
    run = common.Run({**cfg, "seed": 0, "batch_gpu": batch_gpu})
    common.set_rng_state(rng, cfg["device"])
    models = [run.wrap(n) for n in nets]
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    p0 = flat(params)
    with common.SameRandomness(cfg["device"]):
        losses = run.update(opt, params, lambda b: loss_fn(models, b), batch)
    return p0, flat(params), losses


def check(method, variant, out):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    lr = 0.1
    cfg, nets, batch, loss_fn = build(method, variant, out, rank, nodrop=False)
    refs = copy.deepcopy(nets)
    rng = common.rng_state("cpu")
    p0, p1, losses = sgd_update(cfg, nets, batch, loss_fn, lr=lr)
    # reference: this rank's gradient on an unwrapped copy, same draws (and dropout); then the mean over ranks
    ref_params = [p for n in refs for p in n.parameters()]
    common.set_rng_state(rng, "cpu")
    with common.SameRandomness():
        ref_loss = loss_fn(refs, batch)["loss"]
    grads = torch.autograd.grad(ref_loss, ref_params, allow_unused=True)
    g = flat([gr if gr is not None else torch.zeros_like(p) for gr, p in zip(grads, ref_params)])
    tdist.all_reduce(g)
    expected = p0 - lr * g / world
    gathered = [torch.zeros_like(p1) for _ in range(world)]
    tdist.all_gather(gathered, p1)
    moved = [float((flat(n.parameters()) - flat(r.parameters())).abs().max()) for n, r in zip(nets, refs)]
    res = {"loss": float(losses["loss"]), "equal_across_ranks": all(torch.equal(p1, q) for q in gathered),
           "max_dev_from_mean_grad": float((p1 - expected).abs().max()),
           "step_size": float((p1 - p0).abs().max()), "moved_per_net": moved}
    all_losses = [torch.zeros(()) for _ in range(world)]
    tdist.all_gather(all_losses, losses["loss"].detach().reshape(()))
    res["loss_differs_across_ranks"] = bool(all_losses[0] != all_losses[1])
    # gradient accumulation (--batch-gpu 4: two micro-batches per rank, DDP sync on the second only) gives
    # the same update as the whole per-rank batch, with dropout (and label dropout) off
    updates = []
    for micro in (None, 4):
        cfg2, nets2, batch2, loss_fn2 = build(method, variant, out, rank, nodrop=True)
        updates.append(sgd_update(cfg2, nets2, batch2, loss_fn2, micro, lr)[:2])
    (start, whole), (_, accumulated) = updates
    res["accumulation_max_dev"] = float((whole - accumulated).abs().max())
    res["accumulation_step"] = float((whole - start).abs().max())
    with open(os.path.join(out, f"ddp_{method}_{variant}_rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
