"""The fused Triton scoring kernels against the float64 reference (CPU: the interpreter)."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from torch import nn

import paam_fast as pf
from paam_fast import dispatch

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 (conftest does) to run Triton on the CPU",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("PAAM_FAST_POISON", "1")  # unwritten outputs become NaN


def _chain(widths, ks, grouped_dw=False):
    """conv/BN/ReLU chain with the given widths and kernel sizes (odd F and D on purpose)."""
    layers, cin = [], 3
    for w, k in zip(widths, ks):
        layers += [nn.Conv2d(cin, w, k, padding=k // 2), nn.BatchNorm2d(w), nn.ReLU()]
        if grouped_dw:
            layers += [nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    layers += [nn.Conv2d(cin, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    return nn.Sequential(*layers)


class _WideResidual(nn.Module):
    """ResNet50's grouped layer 4 at reduced size: one residual group of F = 200 channels (13
    blocks of 16 rows in the interpreter, so the attention crosses many query and key blocks and
    the unit's max and dL/dmax cross programs) tied across three producers, whose tokens
    concatenate (D = 27 + 2·144), and two inner units."""

    def __init__(self, f: int = 200, inner: int = 16):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, f, 3, padding=1), nn.BatchNorm2d(f)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({
                "c1": nn.Conv2d(f, inner, 1), "b1": nn.BatchNorm2d(inner),
                "c2": nn.Conv2d(inner, f, 3, padding=1), "b2": nn.BatchNorm2d(f)}))
        self.head = nn.Linear(f, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        for b in self.blocks:
            x = F.relu(x + b["b2"](b["c2"](F.relu(b["b1"](b["c1"](x))))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


CASES = [
    ("odd shapes", lambda: _chain([1, 3, 7, 13], [3, 1, 3, 1]), "internal", 8),
    ("large F grouped (ResNet50 layer 4, reduced)", _WideResidual, "grouped", 32),
    ("F=129", lambda: _chain([129, 5], [1, 1]), "internal", 16),
    ("depthwise", lambda: _chain([6, 5, 9], [1, 1, 1], grouped_dw=True), "internal", 8),
    ("grouped, several producers", lambda: pf.models.resnet20(), "grouped_cifar", 8),
    ("equal shapes batched", lambda: _chain([8, 8, 8, 8], [3, 3, 3, 3]), "internal", 32),
]
if DEV == "cuda":  # ResNet50's real layer table: F up to 2048, D up to 4608 (~14k grouped)
    import torchvision

    CASES += [("resnet50", lambda: torchvision.models.resnet50(), "internal", 32),
              ("resnet50 grouped", lambda: torchvision.models.resnet50(), "grouped", 32)]


def _models(make, coupling, dim):
    torch.manual_seed(0)
    if coupling == "grouped_cifar":  # a tiny torchvision-style net with tied residual channels
        class Res(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(3, 6, 3, padding=1)
                self.bn0 = nn.BatchNorm2d(6)
                self.c1, self.b1 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
                self.c2, self.b2 = nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6)
                self.head = nn.Linear(6, 3)

            def forward(self, x):
                x = F.relu(self.bn0(self.stem(x)))
                y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
                return self.head(F.adaptive_avg_pool2d(F.relu(x + y), 1).flatten(1))

        net, coupling = Res(), "grouped"
    else:
        net = make()
    size = 64 if "resnet" in type(net).__name__.lower() else 8
    pf.paamify(net, coupling=coupling, dim=dim, input_size=(1, 3, size, size))
    randomize(net, seed=3)
    with torch.no_grad():  # spread the conv weights so tokens are not all alike
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_()
    return net


def _gates_and_grads(net, dtype, backend, monkeypatch, alive=None):
    """Gates and folded BN affines (γ', β') of one scoring pass, and the gradients of a random
    linear function of all of them w.r.t. the scoring networks and the sites' γ, β."""
    ctrl = net.paam
    monkeypatch.setenv("PAAM_FAST_BACKEND", backend)
    ctrl.refresh()
    gates = ctrl._last.value
    folds = [t for n in ctrl._fold_sites for t in ctrl._mods[n]._paam_fold.value]
    affine = [p for n in ctrl._fold_sites for p in (ctrl._mods[n].weight, ctrl._mods[n].bias)]
    gen = torch.Generator().manual_seed(7)
    outs = list(gates) + folds
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in outs]
    loss = sum((t.double() * c.to(t.device)).sum() for t, c in zip(outs, cot))
    grads = torch.autograd.grad(loss, list(ctrl.groups.parameters()) + affine)
    return [t.detach().double().cpu() for t in outs], [g.double().cpu() for g in grads]


@pytest.mark.parametrize("name,make,coupling,dim", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_every_gradient_match_float64(name, make, coupling, dim, masked,
                                                  monkeypatch):
    net = _models(make, coupling, dim)
    if masked:
        alive = {}
        for u in net.paam.units:
            m = torch.rand(u.width, generator=torch.Generator().manual_seed(u.width)) < 0.6
            m[u.width // 2] = True
            alive[u.name] = m
        pf.apply_masks(net, alive)
    ref = __import__("copy").deepcopy(net).double()
    g64, d64 = _gates_and_grads(ref, torch.float64, "reference", monkeypatch)
    net = net.to(DEV)
    g32, d32 = _gates_and_grads(net, torch.float32, "triton", monkeypatch)
    for a, b in zip(g32, g64):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert len(g32) > len(net.paam.group_units)  # the folded affines are compared too
    big = max(float(b.abs().max()) for b in d64)
    names = [n for n, _ in net.paam.groups.named_parameters()] + \
        [f"{n}.{k}" for n in net.paam._fold_sites for k in ("weight", "bias")]
    assert len(names) == len(d32) == len(d64)
    for pname, a, b in zip(names, d32, d64):
        assert torch.isfinite(a).all(), pname
        # relative to the gradient's size, with an fp32 floor for gradients that are exactly
        # zero in exact arithmetic (e.g. the bias b: g = s / max s does not depend on it)
        assert (a - b).abs().max() <= 5e-5 * b.abs().max() + 2e-6 * big, pname


def _bf16_vs_plain_pytorch(net, monkeypatch, grads: bool) -> list:
    """Triton at bf16 against the float64 reference: errors within 2x those of plain PyTorch at
    bf16, plus a floor: 1e-3 for the gates; for the folded γ', β' and the gradients one bf16
    ulp of the value (the kernel rounds g·γ once from fp32, PyTorch rounds g then the product).
    Returns one (index, finite, error, bound) row per compared tensor; the tests assert on them."""
    copy = __import__("copy")
    g64, d64 = _gates_and_grads(copy.deepcopy(net).double(), torch.float64, "reference",
                                monkeypatch)
    bf = copy.deepcopy(net).to(torch.bfloat16)
    g_ref, d_ref = _gates_and_grads(bf, torch.bfloat16, "reference", monkeypatch)
    g_tr, d_tr = _gates_and_grads(bf.to(DEV), torch.bfloat16, "triton", monkeypatch)
    n_gates = len(net.paam.group_units)
    pairs = list(enumerate(zip(g_tr, g_ref, g64)))
    if grads:
        pairs += [(None, p) for p in zip(d_tr, d_ref, d64)]
    out = []
    for i, (t, r, x) in pairs:
        floor = 1e-3 if i is not None and i < n_gates else 2 ** -7 * float(x.abs().max())
        out.append((i, bool(torch.isfinite(t).all()), float((t - x).abs().max()),
                    float(2 * (r - x).abs().max() + floor)))
    return out  # (output index, finite, Triton's error, bound) per compared tensor


def test_bf16_error_within_twice_plain_pytorch(monkeypatch):
    checks = _bf16_vs_plain_pytorch(_models(CASES[0][1], "internal", 8), monkeypatch, grads=False)
    assert checks and all(finite and err <= bound for _, finite, err, bound in checks), checks


def test_bf16_large_grouped_unit_within_twice_plain_pytorch(monkeypatch):
    checks = _bf16_vs_plain_pytorch(_models(_WideResidual, "grouped", 32), monkeypatch, grads=True)
    assert checks and all(finite and err <= bound for _, finite, err, bound in checks), checks


def test_twenty_steps_triton_vs_reference(monkeypatch):
    def run(backend):
        monkeypatch.setenv("PAAM_FAST_BACKEND", backend)
        torch.manual_seed(0)
        net = _chain([6, 5, 7], [3, 1, 3])
        pf.paamify(net, dim=8, input_size=(1, 3, 8, 8))
        randomize(net, seed=1)
        net = net.to(DEV)
        opt = torch.optim.SGD(pf.param_groups(net), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(20):
            x = torch.randn(8, 3, 8, 8, generator=gen).to(DEV)
            y = torch.randint(0, 3, (8,), generator=gen).to(DEV)
            loss = F.cross_entropy(net(x), y) + 0.5 * pf.penalty(net)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    a, b = run("triton"), run("reference")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_registered_op_passes_opcheck_and_compiles(monkeypatch):
    from paam_fast.triton_scoring import UnitTable

    net = _models(CASES[0][1], "internal", 8).to(DEV)
    ctrl = net.paam
    tab = UnitTable(ctrl)
    tok = torch.cat([ctrl.tokens(i).reshape(-1) for i in tab.order]).float()
    mods = [ctrl._mods[n] for n in tab.sites]
    kinds = [[g.wq for g in ctrl.groups], [g.wk for g in ctrl.groups],
             [g.wv for g in ctrl.groups], [g.w for g in ctrl.groups], [g.b for g in ctrl.groups],
             [m.weight for m in mods], [m.bias for m in mods]]
    flat = torch.cat([t.detach().reshape(-1) for ts in kinds for t in ts]).requires_grad_()
    sizes = [sum(t.numel() for t in ts) for ts in kinds]
    args = (tok, flat, tab.alive, tab.table, tab.site_off, sizes, tab.max_f, tab.max_d, 0.01,
            True)
    torch.library.opcheck(torch.ops.paam_fast.score_units.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    monkeypatch.setenv("PAAM_FAST_BACKEND", "triton")
    x = torch.randn(2, 3, 8, 8, device=DEV)
    ref = net(x)
    got = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dispatch_choices_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("PAAM_FAST_BACKEND", "reference")
    assert dispatch.scoring_backend(cpu)[0] == "reference"
    monkeypatch.setenv("PAAM_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PAAM_FAST_BACKEND must be one of"):
        dispatch.scoring_backend(cpu)
    monkeypatch.setenv("PAAM_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="PAAM_FAST_BACKEND=triton, but Triton kernels run "
                                           "on CUDA tensors"):
        dispatch.scoring_backend(cpu)
    with pytest.raises(RuntimeError, match="fp32/bf16/fp16"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        dispatch.scoring_backend(cpu, torch.float64)
    monkeypatch.delenv("PAAM_FAST_BACKEND")
    assert dispatch.scoring_backend(cpu)[0] == "reference"


@pytest.mark.skipif(DEV != "cuda", reason="TF32 dots need a GPU (the interpreter computes fp32)")
def test_tf32_dots_stay_close_to_float64(monkeypatch):
    net = _models(CASES[-1][1], CASES[-1][2], CASES[-1][3])  # ResNet50 on the GPU
    ref = __import__("copy").deepcopy(net).double()
    g64, _ = _gates_and_grads(ref, torch.float64, "reference", monkeypatch)
    monkeypatch.setenv("PAAM_FAST_TRITON_DOT", "tf32")
    g_tf, _ = _gates_and_grads(net.to(DEV), torch.float32, "triton", monkeypatch)
    for a, b in zip(g_tf, g64):  # TF32 keeps 10 mantissa bits: ~1e-3 relative
        assert (a - b).abs().max() <= 1e-2 * b.abs().max() + 1e-3


def test_dot_mode_is_checked(monkeypatch):
    from paam_fast.triton_scoring import dot_mode

    assert dot_mode(torch.float32) == "tf32x3" and dot_mode(torch.bfloat16) == "bf16"
    monkeypatch.setenv("PAAM_FAST_TRITON_DOT", "ieee")
    assert dot_mode(torch.float32) == "ieee"
    monkeypatch.setenv("PAAM_FAST_TRITON_DOT", "fp8")
    with pytest.raises(ValueError, match="PAAM_FAST_TRITON_DOT"):
        dot_mode(torch.float32)
