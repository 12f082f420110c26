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
    from paam_fast.bench.train_step import make_step, step_warmup

    model, step = make_step("resnet20", 32, 32, True, "cuda", graph=True)
    for _ in range(step_warmup):  # eager warm-up steps, then the capture
        step()
    before = [p.detach().clone() for p in model.parameters()]
    step()  # a replay
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _train_step_run(mode: str) -> tuple[torch.nn.Module, list[float]]:
    from paam_fast.step import TrainStep

    torch.manual_seed(0)
    model = pf.paamify(pf.models.resnet20(), input_size=(1, 3, 32, 32)).cuda()
    opt = torch.optim.SGD(pf.param_groups(model), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    pruner = pf.Pruner(model, opt, epochs=3, lam=0.2, keep=0.5, select_epoch=1)
    step = TrainStep(model, opt, pruner=pruner, mode=mode)
    gen = torch.Generator(device="cuda").manual_seed(5)
    losses = []
    for epoch in range(3):
        for _ in range(6):
            x = torch.randn(32, 3, 32, 32, device="cuda", generator=gen)
            y = torch.randint(0, 10, (32,), device="cuda", generator=gen)
            task, _ = step(x, y)
            losses.append(float(task))  # graph mode returns the same static tensor each call
            sched.step()
        model.eval()  # an evaluation forward leaves other gates in the controller: selection
        with torch.no_grad():  # must still read the last training step's
            model(torch.randn(8, 3, 32, 32, device="cuda") * 3)
        model.train()
        if pruner.epoch_end(epoch):
            step.reset()
    return model, losses


def test_train_step_graph_equals_eager_through_selection_and_compaction(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    m_eager, l_eager = _train_step_run("eager")
    m_graph, l_graph = _train_step_run("graph")
    torch.testing.assert_close(torch.tensor(l_graph), torch.tensor(l_eager), rtol=1e-3,
                               atol=1e-3)
    for (k, a), b in zip(m_graph.state_dict().items(), m_eager.state_dict().values()):
        assert a.shape == b.shape, k
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=k)


def test_paam_train_cli_with_cuda_graphs(tmp_path):
    from paam_fast.train import main

    out = str(tmp_path / "g")
    assert main(["--epochs", "3", "--cuda-graphs", "--amp", "bf16", "--channels-last",
                 "--out", out, "--quiet", "--device", "cuda"]) == 0
    import json

    rep = json.load(open(f"{out}/report.json"))
    assert rep["top1"] > 0.5 and rep["params_final"] <= 0.5 * rep["params_dense"]


def test_a_latency_table_on_cuda_predicts_and_budgets_in_bf16():
    """Issue 20 on the device: a table timed on the GPU (bf16, channels_last, synchronised by
    the harness) gives a positive dense prediction, and a selection under it stays within its
    latency budget by that table."""
    from paam_fast.latency import latency_table

    model = pf.paamify(pf.models.resnet20(), coupling="grouped")
    table = latency_table(model, batch=64, device="cuda", dtype=torch.bfloat16,
                          channels_last=True, grid=3, repeats=3, progress=False)
    assert table.meta["device_kind"] == "cuda" and table.dense_ms > 0
    assert all(c["measured_ms"] > 0 for c in table.check.values() if isinstance(c, dict))
    model(torch.randn(2, 3, 32, 32))  # the gates, on the CPU: the table timed a copy
    sel = pf.select(model, keep=0.7, cost="latency", latency=table)
    assert 0 < sel.latency_ms <= 0.7 * table.dense_ms * (1 + 1e-9)
