"""compact: physical removal in place with the optimizer's state sliced (§6.3, §7)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, rel

import paam_fast as pf


def _train_steps(model, opt, xs, ys, lam=0.0):
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if lam:
            loss = loss + lam * pf.penalty(model)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _setup(opt_name, dtype=torch.float64, arch="resnet20"):
    model = pf.paamify(pf.models.get_model(arch)).to(dtype)
    randomize(model)
    groups = pf.param_groups(model, weight_decay=1e-4)
    if opt_name == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(groups, lr=1e-3)
    xs = [torch.randn(8, 3, 32, 32, dtype=dtype) for _ in range(3)]
    ys = [torch.randint(0, 10, (8,)) for _ in range(3)]
    _train_steps(model, opt, xs, ys, lam=0.5)  # non-trivial optimizer state
    model(xs[0])
    pf.select(model, keep=0.5)
    return model, opt


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_compact_slices_optimizer_state_and_keeps_outputs(opt_name):
    model, opt = _setup(opt_name)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    unit = model.paam.units[0]
    conv = model.get_submodule(unit.producers[0])
    nxt = model.get_submodule(unit.consumers[0][0])
    keep = torch.nonzero(model.paam.mask(0)).flatten()
    state_before = {k: v.clone() for k, v in opt.state[conv.weight].items() if torch.is_tensor(v)}
    nxt_before = {k: v.clone() for k, v in opt.state[nxt.weight].items() if torch.is_tensor(v)}
    model.eval()
    y_eval = model(x)
    model.train()
    torch.manual_seed(0)
    masked = copy.deepcopy(model)
    y_train = masked(x)  # train mode, BN batch statistics (on a copy: running stats move)
    opt_id, n_groups = id(opt), len(opt.param_groups)

    pf.compact(model, optimizer=opt)

    assert id(opt) == opt_id and len(opt.param_groups) == n_groups
    assert opt.param_groups[1]["name"] == "paam" and opt.param_groups[1]["params"] == []
    assert conv.weight.shape[0] == keep.numel() and nxt.weight.shape[1] == keep.numel()
    for k, v in opt.state[conv.weight].items():
        if torch.is_tensor(v) and v.dim() > 0:
            assert torch.equal(v, state_before[k][keep]), k
        elif torch.is_tensor(v):
            assert torch.equal(v, state_before[k])  # Adam's step is kept
    for k, v in opt.state[nxt.weight].items():
        if torch.is_tensor(v) and v.dim() > 0:
            assert torch.equal(v, nxt_before[k][:, keep]), k
    # every parameter with optimizer state has state of its own shape
    for p in model.parameters():
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.shape == p.shape
    assert not any(n.startswith("paam.groups") for n, _ in model.named_parameters())
    model.eval()
    assert rel(model(x), y_eval) <= 1e-12
    model.train()
    assert rel(model(x), y_train) <= 1e-12


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_ten_steps_compacted_equal_ten_steps_masked_with_frozen_gates(opt_name):
    model, opt = _setup(opt_name)
    masked, masked_opt = copy.deepcopy((model, opt))
    pf.freeze(masked, masked_opt)  # masked model, frozen gates, full-size parameters
    pf.compact(model, optimizer=opt)
    xs = [torch.randn(8, 3, 32, 32, dtype=torch.float64) for _ in range(10)]
    ys = [torch.randint(0, 10, (8,)) for _ in range(10)]
    la = _train_steps(model, opt, xs, ys)
    lb = _train_steps(masked, masked_opt, xs, ys)
    assert rel(la, lb) <= 1e-8
    model.eval()
    masked.eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert rel(model(x), masked(x)) <= 1e-8
    # alive-channel parameters agree
    for u in masked.paam.units:
        keep = torch.tensor(model.paam.kept[u.id])
        a = model.get_submodule(u.producers[0]).weight
        b = masked.get_submodule(u.producers[0]).weight[keep]
        assert rel(a, b) <= 1e-8


def test_compact_twice_is_a_no_op_and_select_after_is_refused():
    model, opt = _setup("sgd", torch.float32)
    w1 = pf.compact(model, optimizer=opt)
    w2 = pf.compact(model, optimizer=opt)
    assert w1 == w2
    with pytest.raises(ValueError, match="frozen"):
        pf.select(model, keep=0.5)


def test_compact_grouped_resnet18_and_mobilenet():
    for arch in ("resnet18", "mobilenet_v2"):
        model = pf.paamify(pf.models.get_model(arch), coupling="grouped", input_size=(1, 3, 64, 64))
        randomize(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(2, 3, 64, 64)
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        opt.step()
        model(x)
        pf.select(model, keep=0.5)
        model.eval()
        y = model(x)
        pf.compact(model, opt)
        assert rel(model(x), y) <= 1e-5
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        opt.step()  # training goes on with the same optimizer


def test_a_channels_last_model_stays_channels_last_after_compaction():
    # a compacted model that fell back to NCHW weights would run its convs through layout
    # conversions: the speed of --channels-last lost after selection
    model = pf.paamify(pf.models.get_model("resnet20")).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    opt.step()
    pf.select(model, keep=0.3)
    pf.compact(model, opt)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    bufs = [s["momentum_buffer"] for s in opt.state.values() if s["momentum_buffer"].dim() == 4]
    assert bufs and all(b.is_contiguous(memory_format=torch.channels_last) for b in bufs)
    assert any(not p.is_contiguous() for p in convs)  # truly channels_last, not 1×1 shapes
