"""GPU checks (skipped cleanly without CUDA): the same truths on the device, compile, graphs."""

import pytest
import torch
import torch.nn.functional as F

import paam_fast as pf
from paam_fast import dispatch, masked_ops

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_masked_ops_on_cuda_match_the_cpu_reference():
    ops = dispatch.masked()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 16, 16, generator=gen)
    w = torch.randn(12, 10, 3, 3, generator=gen)
    oi, ii = torch.tensor([0, 3, 4, 9, 11]), torch.tensor([0, 1, 2, 5, 7, 9])
    want = masked_ops.masked_conv2d(x, w, None, None, oi, ii, [1, 1], [1, 1], [1, 1], 1, True)
    got = ops.masked_conv2d(x.cuda(), w.cuda(), None, None, oi.cuda(), ii.cuda(), [1, 1], [1, 1],
                            [1, 1], 1, True)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_paam_model_trains_on_cuda_in_bf16_and_prunes():
    model = pf.paamify(pf.models.resnet20()).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(pf.param_groups(model), lr=0.05, momentum=0.9)
    x = torch.randn(64, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y) + 0.2 * pf.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pf.select(model, keep=0.5)
    model.eval()
    y_m = model(x)
    pf.compact(model, opt)
    torch.testing.assert_close(model(x), y_m, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_of_a_paamified_model():
    model = pf.paamify(pf.models.resnet20()).cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    ref = model(x)
    got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_whole_step_cuda_graph_capture():
    from paam_fast.bench.train_step import graphed, make_step

    model, step = make_step("resnet20", 32, 32, True, "cuda")
    before = [p.detach().clone() for p in model.parameters()]
    replay = graphed(step)
    replay()
    torch.cuda.synchronize()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
