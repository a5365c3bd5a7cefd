"""--compile: a training step whose gradient passes run through torch.compile (the JVP and the target passes
stay eager, common.Run.wrap) makes the update the eager step makes, to float tolerance, dropout included (the
compiled dropout draws the eager masks, so the JVP's F_minus and the compiled F_theta still share them)."""
import torch

import common
import scm


def sct_update(compile_, tmp_path):
    """One sCT update (Alg. 1: a JVP and a forward-backward) of a one-block DiT on 8x8 images, dropout 0.1."""
    cfg = scm.parse_config(["--dataset", "digits", "--model", "DiT-T/2", "--mode", "sct", "--out", str(tmp_path),
                            "--batch-size", "8", "--dropout", "0.1", "--device", "cpu"])
    cfg["compile"] = compile_
    data = type("Shape", (), {"shape": (1, 8, 8), "num_classes": 10, "kind": "image"})()
    run = common.Run(cfg)
    torch.manual_seed(0)
    net = common.build_backbone({**cfg, "model": "DiT-T/2"}, data, depth=1, time_scale=1.0, adanorm="double",
                                dropout=0.1)
    with torch.no_grad():                                  # leave the zero start: every layer gets a gradient
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = run.wrap(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    p0 = torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
    torch.manual_seed(1)
    batch = scm.draw(torch.randn(8, 1, 8, 8), None, cfg)
    losses = run.update(opt, net.parameters(), lambda b: scm.scm_losses(model, None, b, 5, cfg), batch)
    return p0, torch.cat([p.detach().flatten() for p in net.parameters()]), float(losses["loss"])


def test_compiled_step_equals_the_eager_one(tmp_path):
    import torch._dynamo.utils
    p0, eager, loss_eager = sct_update(False, tmp_path / "a")
    torch._dynamo.utils.counters.clear()
    _, compiled, loss_compiled = sct_update(True, tmp_path / "b")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1           # it did compile
    step = (eager - p0).abs().max()
    print(f"compiled vs eager update: {float((compiled - eager).abs().max()):.2e} (step {float(step):.2e}), "
          f"loss {loss_compiled:.6f} vs {loss_eager:.6f}")
    assert step > 1e-4 and (compiled - eager).abs().max() < 1e-4 * step
    assert abs(loss_compiled - loss_eager) < 1e-5 * abs(loss_eager)
