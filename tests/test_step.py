"""The whole-step path of --cuda-graphs: the SGD update from device-side learning rates equals
torch's SGD, and the captured code path (run eagerly, mode="static") trains a paamified model
through selection and compaction exactly like the plain step.  The capture itself is tested on
the GPU (tests/test_gpu.py)."""

import pytest
import torch
from helpers import rel

import paam_fast as pf
from paam_fast.paamify import controller
from paam_fast.step import TrainStep, sgd_update


@pytest.mark.parametrize("kw", [
    {"momentum": 0.9, "weight_decay": 1e-2},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"momentum": 0.5, "dampening": 0.3},
    {"momentum": 0.0, "weight_decay": 1e-3, "maximize": True},
])
def test_sgd_update_equals_torch_sgd(kw):
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 3, 3)]
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    groups = lambda q: [{"params": q[:2]}, {"params": q[2:], "weight_decay": 0.0}]
    ref = torch.optim.SGD(groups(a), lr=0.1, **kw)
    ours = torch.optim.SGD(groups(b), lr=0.1, **kw)
    lrs = [torch.zeros((), dtype=torch.float64) for _ in ours.param_groups]
    for step in range(6):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        if step == 3:
            grads[1] = None  # a parameter without a gradient this step is skipped by both
        for pa, pb, g in zip(a, b, grads):
            pa.grad = None if g is None else g.clone()
            pb.grad = None if g is None else g.clone()
        for grp_a, grp_b in zip(ref.param_groups, ours.param_groups):
            grp_a["lr"] = grp_b["lr"] = 0.1 / (step + 1)  # a schedule: lr changes every step
        ref.step()
        for t, g in zip(lrs, ours.param_groups):
            t.fill_(g["lr"])
        sgd_update(ours, lrs)
        for pa, pb in zip(a, b):
            assert rel(pb, pa) <= 1e-14
    if kw["momentum"]:
        for pa, pb in zip(a, b):
            assert rel(ours.state[pb]["momentum_buffer"], ref.state[pa]["momentum_buffer"]) \
                <= 1e-14


def test_sgd_update_rejects_other_optimizers():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="SGD"):
        sgd_update(torch.optim.Adam([p]), [torch.tensor(0.1)])
    with pytest.raises(TypeError, match="SGD"):
        TrainStep(torch.nn.Linear(2, 2), torch.optim.Adam([p]), mode="graph")
    with pytest.raises(ValueError, match="warmup"):
        TrainStep(torch.nn.Linear(2, 2), torch.optim.SGD([p], lr=0.1), mode="graph", warmup=0)
    with pytest.raises(ValueError, match="mode"):
        TrainStep(torch.nn.Linear(2, 2), torch.optim.SGD([p], lr=0.1), mode="cuda")


def _run(mode: str) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    model = pf.models.resnet20(num_classes=10).double()
    pf.paamify(model, input_size=(1, 3, 16, 16))
    model.double()
    opt = torch.optim.SGD(pf.param_groups(model), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    pruner = pf.Pruner(model, opt, epochs=3, lam=0.3, keep=0.5, select_epoch=1)
    step = TrainStep(model, opt, pruner=pruner, mode=mode)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for epoch in range(3):
        for i in range(3):
            bs = 4 if i < 2 else 3  # an odd-sized last batch takes the uncaptured path
            x = torch.randn(bs, 3, 16, 16, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 10, (bs,), generator=gen)
            task, correct = step(x, y)
            assert task.dim() == 0 and correct.dim() == 0
            losses.append(float(task))
            sched.step()
        if pruner.epoch_end(epoch):
            step.reset()  # selection/compaction changed the model: capture again
    return model, losses


def test_static_step_trains_like_the_plain_step_through_compaction():
    m_eager, l_eager = _run("eager")
    m_static, l_static = _run("static")
    assert controller(m_static).compacted
    # the loss is taken in fp32 (out.float()), so float64 rounding differences of the update
    # (~1e-16) surface at fp32 resolution; a wrong lr, decay or momentum would be ~1e-2
    for a, b in zip(l_static, l_eager):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b))
    sa, sb = m_static.state_dict(), m_eager.state_dict()
    assert sa.keys() == sb.keys()
    for k in sb:
        assert sa[k].shape == sb[k].shape, k
        if sb[k].is_floating_point():
            assert rel(sa[k], sb[k]) <= 1e-6, k
        else:
            assert torch.equal(sa[k], sb[k]), k


def test_post_backward_sees_the_gradients_before_the_update_in_eager_mode_only():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0 = model.weight.detach().clone()
    seen = []

    def hook():  # what a peer's regularizer does: add to .grad before the update
        seen.append(model.weight.grad.clone())
        model.weight.grad.add_(1.0)

    step = TrainStep(model, opt, post_backward=hook)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    step(x, y)
    assert len(seen) == 1
    torch.testing.assert_close(model.weight.detach(), w0 - 0.1 * (seen[0] + 1.0))
    with pytest.raises(ValueError, match="post_backward"):
        TrainStep(model, opt, mode="static", post_backward=hook)
