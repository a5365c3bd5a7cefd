"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_distributed.py: exercises the
distributed helpers of common.py and writes what each rank saw to OUT/rank{r}.json."""
import copy
import json
import os
import sys

import torch
import torch.distributed as tdist

import common


class Indexed:
    """A finite dataset whose samples are their own indices."""
    kind, shape, num_classes = "image", (1,), 1

    def __len__(self):
        return 40

    def get(self, idx):
        return idx.float()[:, None], torch.zeros(len(idx), dtype=torch.int64)


def gather(x):
    out = [torch.zeros_like(x) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, x)
    return out


def main(out):
    cfg = {**common.COMMON_DEFAULTS, "method": "demo", "dataset": "moons", "out": out, "batch_size": 8,
           "steps": 1, "seed": 3}
    run = common.Run(cfg)
    d = run.dist
    res = {"rank": d.rank, "world": d.world_size, "ddp": d.ddp, "backend": tdist.get_backend(),
           "batch_per_rank": run.batch_per_rank}
    # per-rank seeds: different noise on each rank
    res["first_draw"] = torch.rand(1).item()
    res["mean"] = common.all_reduce_mean(torch.tensor([float(d.rank)])).item()

    # the loader shards one epoch over the ranks without overlap
    ld = common.Loader(Indexed(), 4, d, seed=0)
    seen = torch.cat([ld.next()[0] for _ in range(5)]).flatten()
    res["indices"] = seen.tolist()

    # feature statistics: each rank adds half the features; the all-reduced result is the whole set's
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 6, generator=g, dtype=torch.float64)
    st = common.FeatureStats(dim=6)
    st.add(feats[d.rank::2])
    mu, sigma = st.finish()
    res["stats_ok"] = bool(torch.allclose(torch.from_numpy(mu), feats.mean(0)) and
                           torch.allclose(torch.from_numpy(sigma), torch.cov(feats.T)))

    # one DDP update whose loss uses a JVP of the *unwrapped* model (stop-grad) and a gradient pass
    # through DDP: the parameters stay identical on both ranks and equal the mean-gradient step.
    torch.manual_seed(0)                                          # same initial weights on both ranks
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    reference = copy.deepcopy(net)
    model = run.wrap(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + d.rank))   # different data per rank

    def loss_of(m_grad, m_jvp, x):
        F_minus, dF = common.jvp(m_jvp, (x,), (torch.ones_like(x),))
        return ((m_grad(x) - F_minus - 0.1 * dF) ** 2).mean()
    run.update(opt, model.parameters(), lambda b: {"loss": loss_of(model, common.unwrap(model), b["x"])}, {"x": x})
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    res["params_equal_across_ranks"] = bool(all(torch.equal(params, q) for q in gather(params)))
    grads = []
    for xr in gather(x):                                          # the per-rank gradients, recomputed here
        ref = copy.deepcopy(reference)
        loss_of(ref, copy.deepcopy(reference), xr).backward()
        grads.append([p.grad for p in ref.parameters()])
    with torch.no_grad():
        for i, p in enumerate(reference.parameters()):
            p -= 0.5 * sum(gr[i] for gr in grads) / len(grads)
    ref_params = torch.cat([p.detach().flatten() for p in reference.parameters()])
    res["matches_mean_gradient"] = float((params - ref_params).abs().max())
    res["moved"] = float((ref_params - torch.cat([p.detach().flatten() for p in net.parameters()])).abs().max() == 0)

    # checkpoint keeps both ranks' RNG streams; restore gives each rank its own back
    run.checkpoint(1, {"model": common.unwrap(model)})
    expected = torch.rand(3)
    torch.manual_seed(999)
    run2 = common.Run({**cfg, "resume": True})
    run2.restore({"model": common.unwrap(model)})
    res["rng_restored"] = bool(torch.equal(torch.rand(3), expected))
    with open(os.path.join(out, f"rank{d.rank}.json"), "w") as f:
        json.dump(res, f)
    run.close()


if __name__ == "__main__":
    main(sys.argv[1])
