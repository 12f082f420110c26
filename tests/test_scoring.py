"""The scoring network's reference (§3): maths, batching, masking, gradients."""

import math

import pytest
import torch

import paam_fast as pf
from paam_fast.scoring import leaky_exp, score_batched, score_unit


def _params(g, f, d_tok, dim=8, dtype=torch.float64, head=True):
    gen = torch.Generator().manual_seed(g * 1000 + f * 10 + d_tok)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    x = r(g, f, d_tok)
    wq, wk, wv = (r(g, d_tok, dim) / math.sqrt(d_tok) for _ in range(3))
    w = r(g, dim) if head else torch.zeros(g, dim, dtype=dtype)
    b = r(g) * 0.3 if head else torch.zeros(g, dtype=dtype)
    return x, wq, wk, wv, w, b


def _by_hand(x, wq, wk, wv, w, b, leak, normalize):
    """One unit, written out from the formulas of PAAM_METHOD.md §3."""
    x = x / x.square().mean().sqrt()
    q, k, v = x @ wq, x @ wk, x @ wv
    p = torch.softmax(q @ k.T / math.sqrt(wq.shape[1]), dim=1)
    e = (p @ v) @ w + b
    s = torch.where(e <= 0, torch.exp(e), 1 + leak * e)
    return s / s.max() if normalize == "max" else s


@pytest.mark.parametrize("normalize", ["max", "none"])
@pytest.mark.parametrize("f,d_tok", [(1, 1), (3, 7), (7, 27), (129, 9)])
def test_reference_matches_the_formulas(f, d_tok, normalize):
    x, wq, wk, wv, w, b = _params(3, f, d_tok)
    g = score_batched(x, wq, wk, wv, w, b, None, 0.01, normalize)
    for i in range(3):
        want = _by_hand(x[i], wq[i], wk[i], wv[i], w[i], b[i], 0.01, normalize)
        torch.testing.assert_close(g[i], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(score_unit(x[i], wq[i], wk[i], wv[i], w[i], b[i], None, 0.01,
                                              normalize), g[i], rtol=1e-12, atol=0)
    if normalize == "max":
        torch.testing.assert_close(g.amax(-1), torch.ones(3, dtype=g.dtype))


def test_zero_head_gives_exactly_one():
    x, wq, wk, wv, w, b = _params(2, 5, 11, head=False)
    for normalize in ("max", "none"):
        g = score_batched(x.float(), wq.float(), wk.float(), wv.float(), w.float(), b.float(),
                          normalize=normalize)
        assert torch.equal(g, torch.ones_like(g))


def test_leaky_exp_values_and_slope_one_at_zero():
    e = torch.tensor([-3.0, -1e-3, 0.0, 1e-3, 5.0], dtype=torch.float64, requires_grad=True)
    s = leaky_exp(e, 0.01)
    want = torch.tensor([math.exp(-3), math.exp(-1e-3), 1.0, 1 + 1e-5, 1.05], dtype=torch.float64)
    torch.testing.assert_close(s, want)
    (g,) = torch.autograd.grad(s.sum(), e)
    torch.testing.assert_close(g, torch.tensor([math.exp(-3), math.exp(-1e-3), 1.0, 0.01, 0.01],
                                               dtype=torch.float64))


def test_alive_mask_equals_scoring_only_the_alive_filters():
    x, wq, wk, wv, w, b = _params(1, 9, 5)
    alive = torch.tensor([[True, False, True, True, False, True, True, False, True]])
    g = score_batched(x, wq, wk, wv, w, b, alive)
    sub = score_batched(x[:, alive[0]], wq, wk, wv, w, b)
    torch.testing.assert_close(g[0, alive[0]], sub[0], rtol=1e-12, atol=0)
    assert torch.all(g[0, ~alive[0]] == 0)


def test_gradcheck_through_every_scoring_parameter():
    x, wq, wk, wv, w, b = _params(2, 5, 6, dim=4)
    alive = torch.tensor([[True] * 5, [True, False, True, True, True]])
    args = [t.clone().requires_grad_(True) for t in (wq, wk, wv, w, b)]
    for normalize in ("max", "none"):
        assert torch.autograd.gradcheck(
            lambda *a: score_batched(x, *a, alive=alive, leak=0.01, normalize=normalize), args)


def test_batched_reference_groups_units_of_equal_shape():
    model = pf.paamify(pf.models.get_model("resnet50"), input_size=(1, 3, 64, 64))
    ctrl = model.paam
    shapes = {(u.width, ctrl._token_dim(u)) for u in ctrl.units}
    assert len(ctrl.groups) == len(shapes) < len(ctrl.units)
    # the batched gates equal one chain per unit
    from helpers import randomize

    randomize(model)
    model(torch.randn(1, 3, 64, 64))
    got = pf.scores(model)
    for grp, idx in zip(ctrl.groups, ctrl.group_units):
        for row, i in enumerate(idx):
            want = score_unit(ctrl.tokens(i), grp.wq[row], grp.wk[row], grp.wv[row], grp.w[row],
                              grp.b[row], None, ctrl.leak, ctrl.normalize)
            torch.testing.assert_close(got[ctrl.units[i].name], want.detach(), rtol=1e-5,
                                       atol=1e-6)


def test_penalty_costs_and_gradient():
    model = pf.paamify(pf.models.get_model("resnet20"))
    from helpers import randomize

    randomize(model)
    model(torch.randn(2, 3, 32, 32))
    g = model.paam.unit_gates()
    for cost in ("uniform", "params", "flops"):
        c = model.paam.filter_costs(cost)
        want = sum(ci * gi.sum() for ci, gi in zip(c, g)) / sum(ci * gi.numel()
                                                               for ci, gi in zip(c, g))
        got = pf.penalty(model, cost)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.detach(), want.float())
    # a filter of a 64-wide stage-3 unit costs 4x a stage-1 one: 9*32... counted, not guessed
    c = model.paam.filter_costs("params")
    assert c[0] == 2 * (16 * 9) + 2 and c[-1] == 2 * (64 * 9) + 2
    pf.penalty(model).backward()
    grads = [p.grad for p in model.paam.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
    # the task loss never reaches the scoring networks through the tokens (they are detached)
    for p in model.parameters():
        p.grad = None
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    conv = model.get_submodule(model.paam.units[0].producers[0])
    assert conv.weight.grad is not None


def test_residual_scoring_adds_each_filters_own_value_row():
    from paam_fast.scoring import rms_tokens

    gen = torch.Generator().manual_seed(3)
    x, wq, wk, wv = (torch.randn(*s, generator=gen, dtype=torch.float64)
                     for s in ((2, 7, 18), (2, 18, 4), (2, 18, 4), (2, 18, 4)))
    w = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64)
    xr = rms_tokens(x)
    p = torch.softmax(xr @ wq @ (xr @ wk).transpose(1, 2) / math.sqrt(4), -1)
    v = xr @ wv
    s = leaky_exp(((v + p @ v) @ w[:, :, None])[..., 0], 0.01)
    want = s / s.amax(-1, keepdim=True)
    got = score_batched(x, wq, wk, wv, w, b, residual=True)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(score_batched(x, wq, wk, wv, w, b), want, atol=1e-3)


def test_residual_scoring_reaches_the_model_and_starts_dense():
    model = pf.paamify(pf.models.get_model("resnet20"), residual=True)
    assert model.paam.residual
    model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(g, torch.ones_like(g)) for g in model.paam.unit_gates())
