"""--batch-gpu on one process: for every method (and variant of tests/ddp_step.py), one update from two
micro-batches per step equals the update from the whole batch to float tolerance (dropout off), on the CPU and,
where there is one, on a CUDA GPU (TF32 off there: the comparison is at fp32 accuracy; with TF32 the two
updates would differ by TF32's rounding, about 1e-3 of the step). The same check under torchrun (two
processes, DDP's sync on the last micro-batch only) is in tests/ddp_step.py."""
import pytest

import ddp_step

VARIANTS = [("direct", "default"), ("direct", "cfg"), ("direct", "no-stop-grad"), ("gcm", "cu-l2"),
            ("gcm", "vu-mmd"), ("gcm", "analytic"), ("scm", "sct"), ("scm", "discrete"), ("scm", "scd-cfg"),
            ("decm", "teacher"), ("decm", "cd-fm"), ("decm", "cfg-n2n-fm"), ("decm", "scratch-n2n-fm")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("method,variant", VARIANTS)
def test_accumulated_update_equals_the_whole_batch(method, variant, device, tmp_path):
    updates = []
    for micro in (None, 4):
        cfg, nets, batch, loss_fn = ddp_step.build(method, variant, str(tmp_path), 0, nodrop=True, device=device)
        updates.append(ddp_step.sgd_update(cfg, nets, batch, loss_fn, micro))
    (p0, whole, _), (_, accumulated, _) = updates
    step = (whole - p0).abs().max()
    assert step > 1e-4 and (whole - accumulated).abs().max() < 1e-6 + 1e-5 * step
