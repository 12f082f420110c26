"""The mask-aware compacted ops (C++ extension and its Python reference) and masked training."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, rel

import paam_fast as pf
from paam_fast import _ext, dispatch, masked_ops

HAS_EXT = _ext.load(jit=False)
IMPLS = [pytest.param(masked_ops, id="reference"),
         pytest.param(dispatch._ExtOps, id="cpp",
                      marks=pytest.mark.skipif(not HAS_EXT, reason="extension not built"))]


def _idx(n, k, gen):
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


CONV_CASES = [  # (c_in, c_out, k, stride, depthwise, n_in_alive, n_out_alive)
    (5, 7, 3, 1, False, 3, 4),
    (6, 4, 1, 2, False, 6, 1),
    (4, 9, 3, 2, False, 1, 9),
    (8, 8, 3, 1, True, None, 3),
    (5, 5, 3, 2, True, None, 1),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bn_relu_block_equals_the_plain_masked_block(impl, case):
    c_in, c_out, k, stride, dw, n_in, n_out = case
    gen = torch.Generator().manual_seed(sum(case[:4]))
    dt = torch.float64
    groups = c_out if dw else 1
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dt)
    w = r(c_out, 1 if dw else c_in, k, k).requires_grad_()
    bias = r(c_out).requires_grad_()
    gamma, beta = (r(c_out) + 2).requires_grad_(), r(c_out).requires_grad_()
    gate = torch.rand(c_out, generator=gen, dtype=dt).requires_grad_()
    out_idx = _idx(c_out, n_out, gen)
    in_idx = out_idx if dw else _idx(c_in, n_in, gen)
    x_full = r(3, c_in, 7, 7)
    in_mask = torch.zeros(c_in, dtype=dt)
    in_mask[in_idx] = 1
    x_full = x_full * in_mask[None, :, None, None]  # dead input channels are zero
    x_c = x_full[:, in_idx].clone()
    out_mask = torch.zeros(c_out, dtype=dt)
    out_mask[out_idx] = 1
    rm0, rv0 = r(c_out) * 0.1, torch.rand(c_out, generator=gen, dtype=dt) + 0.5

    # plain masked block on full tensors
    rm_a, rv_a = rm0.clone(), rv0.clone()
    z = F.conv2d(x_full, w, bias, stride, k // 2, 1, groups)
    g = gate * out_mask
    y_full = F.relu(F.batch_norm(z, rm_a, rv_a, gamma * g, beta * g, True, 0.1, 1e-5))
    # compact block
    rm_b, rv_b = rm0.clone(), rv0.clone()
    zc = impl.masked_conv2d(x_c, w, bias, None, out_idx, None if dw else in_idx, [stride] * 2,
                            [k // 2] * 2, [1, 1], groups, True)
    y_c = F.relu(impl.masked_batch_norm(zc, gamma, beta, rm_b, rv_b, gate, out_idx, True, 0.1,
                                        1e-5, True))
    torch.testing.assert_close(y_c, y_full[:, out_idx], rtol=1e-10, atol=1e-12)
    assert torch.all(y_full[:, out_mask == 0] == 0)
    # running statistics: alive updated identically, dead untouched in the compact op
    torch.testing.assert_close(rm_b[out_idx], rm_a[out_idx])
    torch.testing.assert_close(rv_b[out_idx], rv_a[out_idx])
    dead = out_mask == 0
    assert torch.equal(rm_b[dead], rm0[dead]) and torch.equal(rv_b[dead], rv0[dead])
    # every gradient, full-size, exact zeros where dead
    dy = r(*y_c.shape)
    params = [w, bias, gamma, beta, gate]
    ga = torch.autograd.grad((y_full[:, out_idx] * dy).sum(), params)
    gb = torch.autograd.grad((y_c * dy).sum(), params)
    for a, b, name in zip(ga, gb, ["weight", "bias", "gamma", "beta", "gate"]):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)
        assert torch.all(b[dead] == 0), name
    if not dw:
        dead_in = in_mask == 0
        assert torch.all(gb[0][:, dead_in] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_of_the_ops(impl):
    gen = torch.Generator().manual_seed(0)
    dt = torch.float64
    x = torch.randn(2, 3, 5, 5, dtype=dt, generator=gen, requires_grad=True)
    w = torch.randn(6, 5, 3, 3, dtype=dt, generator=gen, requires_grad=True)
    g = torch.rand(6, dtype=dt, generator=gen, requires_grad=True)
    oi, ii = torch.tensor([0, 2, 5]), torch.tensor([1, 2, 4])
    assert torch.autograd.gradcheck(
        lambda x, w, g: impl.masked_conv2d(x, w, None, g, oi, ii, [2, 2], [1, 1], [1, 1], 1, True),
        (x, w, g))
    xb = torch.randn(4, 3, 3, 3, dtype=dt, generator=gen, requires_grad=True)
    gam = torch.randn(6, dtype=dt, generator=gen, requires_grad=True)
    bet = torch.randn(6, dtype=dt, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b, g: impl.masked_batch_norm(x, a, b, None, None, g, oi, True, 0.1, 1e-5,
                                                  True), (xb, gam, bet, g))
    xl = torch.randn(4, 6, dtype=dt, generator=gen, requires_grad=True)
    wl = torch.randn(3, 10, dtype=dt, generator=gen, requires_grad=True)
    fi = torch.tensor([0, 1, 4, 5, 8, 9])
    assert torch.autograd.gradcheck(lambda x, w: impl.masked_linear(x, w, None, fi, True),
                                    (xl, wl))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_cpp_ops_pass_opcheck_and_compile():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    oi, ii = torch.tensor([1, 3]), torch.tensor([0, 2, 3])
    xs = x[:, ii].clone()
    torch.library.opcheck(torch.ops.paam_fast.masked_conv2d.default,
                          (xs, w, None, None, oi, ii, [1, 1], [1, 1], [1, 1], 1, True))
    torch.library.opcheck(torch.ops.paam_fast.masked_linear.default,
                          (torch.randn(3, 2), torch.randn(4, 5), None, torch.tensor([1, 4]),
                           True))

    def f(x, w):
        return torch.ops.paam_fast.masked_conv2d(x, w, None, None, oi, ii, [1, 1], [1, 1],
                                                 [1, 1], 1, False).relu().sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xs, w)
    torch.testing.assert_close(got, f(xs, w))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("idx,msg", [
    (torch.tensor([0, 7]), "out_idx holds indices outside \\[0, 5\\)"),
    (torch.tensor([1, 1]), "out_idx holds the duplicate index 1"),
    (torch.tensor([3, 1]), "out_idx must be sorted ascending"),
    (torch.tensor([], dtype=torch.long), "out_idx is empty"),
    (torch.tensor([0.0, 1.0]), "out_idx must be int64"),
])
def test_cpp_errors_name_the_argument(idx, msg):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(5, 4, 3, 3)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.paam_fast.masked_conv2d(x, w, None, None, idx, None, [1, 1], [1, 1], [1, 1],
                                          1, True)
    with pytest.raises(RuntimeError, match="x has dtype Float but the weight has Double|"
                                           "x .* dtype"):
        torch.ops.paam_fast.masked_conv2d(x, w.double(), None, None, None, None, [1, 1], [1, 1],
                                          [1, 1], 1, True)


def _masked_run(compute: str, backend_ops, dtype, steps=20):
    torch.manual_seed(0)
    model = pf.paamify(pf.models.resnet20()).to(dtype)
    randomize(model)
    # A gentle step size: on random labels a large one amplifies rounding differences between
    # two correct summation orders step after step (seen in fp64: 1e-15 -> 1e-4 in 14 steps at
    # lr 0.05; in fp32 even plain training, no pruning, turns a 1e-6 input change into 1e-2 of
    # loss in 20 steps at lr 0.01), which would test the dynamics, not the ops.
    fp64 = dtype == torch.float64
    opt = torch.optim.SGD(pf.param_groups(model), lr=0.01 if fp64 else 1e-3,
                          momentum=0.9 if fp64 else 0.0)
    xs = [torch.randn(16, 3, 32, 32, dtype=dtype) for _ in range(steps)]
    ys = [torch.randint(0, 10, (16,)) for _ in range(steps)]
    losses = []
    orig = dispatch.masked
    dispatch.masked = lambda: backend_ops  # read when the masks change
    try:
        model(xs[0])
        model.paam.masked_compute = compute
        pf.select(model, keep=0.5)
        for i, (x, y) in enumerate(zip(xs, ys)):
            loss = F.cross_entropy(model(x), y) + 0.1 * pf.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if i == steps // 2:  # a second selection event, as masked mode has
                pf.select(model, keep=0.4)
    finally:
        dispatch.masked = orig
    return model, torch.stack(losses)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
@pytest.mark.parametrize("impl", IMPLS)
def test_twenty_masked_steps_compact_equal_reference(impl, dtype, tol):
    ref, la = _masked_run("dense", masked_ops, dtype)
    ext, lb = _masked_run("compact", impl, dtype)
    assert rel(lb, la) <= tol
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    ref.eval()
    ext.eval()
    assert rel(ext(x), ref(x)) <= tol
    for i, u in enumerate(ref.paam.units):
        keep = ref.paam.mask(i)
        for name in u.producers + u.channelwise:
            a = ext.get_submodule(name).weight[keep]
            b = ref.get_submodule(name).weight[keep]
            assert rel(a, b) <= tol, name
        # dead channels' BN statistics stayed frozen in both
        for name in u.channelwise:
            m_ref, m_ext = ref.get_submodule(name), ext.get_submodule(name)
            if isinstance(m_ref, torch.nn.BatchNorm2d):
                assert rel(m_ext.running_mean, m_ref.running_mean) <= tol


def test_masked_compact_model_compiles_fullgraph():
    model = pf.paamify(pf.models.resnet20())
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    model(x)
    pf.select(model, keep=0.5)
    ref = model(x)
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    conv = model.get_submodule(model.paam.units[0].producers[0])
    dead = ~model.paam.mask(0)
    assert conv.weight.grad is not None and torch.all(conv.weight.grad[dead] == 0)


def test_trains_without_the_extension(monkeypatch):
    monkeypatch.setattr(dispatch, "masked_backend", lambda: ("reference", "simulated absent"))
    ops = dispatch.masked()  # the reference functions, in a picklable namespace
    assert ops.masked_conv2d is masked_ops.masked_conv2d
    assert ops.masked_batch_norm is masked_ops.masked_batch_norm
    assert ops.masked_linear is masked_ops.masked_linear
    model = pf.paamify(pf.models.resnet20())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = pf.Pruner(model, opt, epochs=3, keep=0.5, after_select="masked", select_epoch=1,
                       final_epoch=2, steps=1)
    for epoch in range(3):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.epoch_end(epoch)
    assert model.paam.compacted


def test_jit_build_when_not_prebuilt(tmp_path):
    code = ("import torch, paam_fast as pf\n"
            "from paam_fast import _ext, dispatch\n"
            "assert dispatch.masked_backend()[0] == 'cpp', _ext.status()\n"
            "print(_ext.status()[1])\n")
    env = {**os.environ, "PAAM_FAST_EXT": "jit", "PAAM_FAST_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "JIT-built with ninja" in res.stdout
    env["PAAM_FAST_EXT"] = "0"
    res = subprocess.run([sys.executable, "-m", "paam_fast.info"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "disabled by PAAM_FAST_EXT=0" in res.stdout


def test_masked_model_deepcopies_on_the_reference_ops(monkeypatch):
    # the modules hold the ops' namespace: with the extension off it must still be copyable
    import copy

    monkeypatch.setenv("PAAM_FAST_EXT", "0")
    monkeypatch.setenv("PAAM_FAST_BACKEND", "reference")
    net = pf.paamify(pf.models.resnet20(), input_size=(1, 3, 32, 32))
    net.paam.masked_compute = "compact"
    alive = {u.name: torch.arange(u.width) % 2 == 0 for u in net.paam.units}
    pf.apply_masks(net, alive)
    twin = copy.deepcopy(net)
    x = torch.randn(2, 3, 32, 32)
    net.eval(), twin.eval()
    torch.testing.assert_close(twin(x), net(x))
