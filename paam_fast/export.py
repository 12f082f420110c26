"""Export to plain torch modules, and pickle-free save / load (PAAM_METHOD.md §6.4).

``export`` compacts a copy of the model (if it was not compacted yet), folds the frozen gates
into BN's γ and β (or the conv's W and b) and returns a model with no paam_fast gating classes.
``save`` writes a JSON plan of the kept channels and a ``state_dict`` with ``torch.save``; the
file loads with ``torch.load(weights_only=True)`` (no pickled classes).  ``load`` builds a fresh
model with ``model_fn``, re-applies the plan, and loads the weights.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .graph import Cat
from .models.resnet_cifar import PadShortcut
from .nn import (
    GatedBatchNorm2d,
    GatedConv2d,
    GatedConvBN2d,
    GatedLinear,
    MaskedPadShortcut,
    recast,
)
from .paamify import compact, controller, is_paamified
from .surgery import slice_cats, slice_space

__all__ = ["export", "plan_of", "apply_plan", "save", "load", "PLAN_FORMAT"]

PLAN_FORMAT = "paam_fast.plan/1"


def plan_of(model: nn.Module) -> dict:
    """The JSON-able plan of a paamified model: for every gated space, the dense indices of its
    kept channels and the modules that carry them."""
    ctrl = controller(model)
    spaces = []
    for i, u in enumerate(ctrl.units):
        keep = ctrl.kept.get(u.id)
        if keep is None:
            keep = torch.nonzero(ctrl.mask(i)).flatten().tolist()
        spaces.append({"name": u.name, "dense": u.width, "keep": keep, **u.to_json()})
    pos = {u.id: i for i, u in enumerate(ctrl.units)}
    # concatenations: segments by position in "spaces" (-1: not gated, kept whole)
    cats = [{"name": c.name, "segments": [[pos.get(sid, -1), w] for sid, w in c.segments],
             "consumers": [list(x) for x in c.consumers]} for c in ctrl.structure.cats]
    return {"format": PLAN_FORMAT, "coupling": ctrl.coupling, "spaces": spaces, "cats": cats}


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def _fold(m: nn.Module) -> None:
    g = m._buffers.get("paam_gate")
    if g is None:
        return
    if m.weight is None:
        raise ValueError("cannot fold a gate into a BatchNorm without affine parameters")
    shape = (-1,) + (1,) * (m.weight.dim() - 1)
    m.weight.mul_(g.to(m.weight.dtype).reshape(shape))
    if m.bias is not None:
        m.bias.mul_(g.to(m.bias.dtype))


def export(model: nn.Module) -> nn.Module:
    """A plain-torch copy of a paamified model: compacted, gates folded, ANs and hooks gone.

    The copy carries ``paam_plan`` (the JSON plan) for :func:`save`; the input model is left
    as it was.  Works with ``torch.export.export``.
    """
    if not is_paamified(model):
        raise ValueError("export expects a paamified model (paam_fast.paamify)")
    plain = copy.deepcopy(model)
    ctrl = plain.paam
    compact(plain)
    plan = plan_of(plain)
    for name, m in list(plain.named_modules()):
        if isinstance(m, GatedConvBN2d):
            continue
        if isinstance(m, GatedBatchNorm2d):
            _fold(m)
            _set(plain, name, recast(m, nn.BatchNorm2d))
        elif isinstance(m, GatedConv2d):
            _fold(m)
            _set(plain, name, recast(m, nn.Conv2d))
        elif isinstance(m, GatedLinear):
            _fold(m)
            _set(plain, name, recast(m, nn.Linear))
        elif isinstance(m, MaskedPadShortcut):  # compacted: its map says it all
            _set(plain, name, recast(m, PadShortcut))
    for name, m in list(plain.named_modules()):
        if isinstance(m, GatedConvBN2d):
            _set(plain, name, nn.Sequential(OrderedDict(conv=m.conv, bn=m.bn)))
    for key, hook in list(plain._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is ctrl:
            del plain._forward_pre_hooks[key]
    del plain.paam
    plain.paam_plan = plan
    return plain


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Slice a freshly built (dense, plain) model to the widths of ``plan``, in place."""
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a paam_fast plan (format {plan.get('format')!r})")
    mods = dict(model.named_modules())
    for cat in plan.get("cats", []):
        missing = [c[0] for c in cat["consumers"] if c[0] not in mods]
        if missing:
            raise ValueError(f"the plan names modules this model does not have: {missing[:3]}; "
                             "model_fn must build the architecture that was saved")
    for sp in plan["spaces"]:
        writers = sp["producers"] + sp.get("scales", []) + sp.get("shifts", [])
        names = writers + sp["channelwise"] + [c[0] for c in sp["consumers"]]
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"the plan names modules this model does not have: {missing[:3]}; "
                             "model_fn must build the architecture that was saved")
        for n in sp["producers"] + sp["channelwise"]:
            w = mods[n].weight
            if w is not None and w.shape[0] != sp["dense"]:
                raise ValueError(f"module '{n}' has {w.shape[0]} channels, the plan expects "
                                 f"{sp['dense']}")
        if len(sp["keep"]) < sp["dense"]:
            idx = torch.tensor(sp["keep"], dtype=torch.long)
            slice_space(mods, writers, sp["channelwise"],
                        [tuple(c) for c in sp["consumers"]], idx)
    spaces = plan["spaces"]
    cats = [Cat(id=k, name=c["name"], segments=[(i, w) for i, w in c["segments"]],
                consumers=[tuple(x) for x in c["consumers"]])
            for k, c in enumerate(plan.get("cats", []))]
    kept = {i: torch.tensor(sp["keep"], dtype=torch.long) for i, sp in enumerate(spaces)
            if len(sp["keep"]) < sp["dense"]}
    slice_cats(mods, cats, kept)
    model.paam_plan = plan
    return model


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (paamified: exported first) as a plan + state_dict, atomically."""
    if is_paamified(model):
        model = export(model)
    plan = getattr(model, "paam_plan", {"format": PLAN_FORMAT, "spaces": []})
    payload = {"format": PLAN_FORMAT, "plan": json.dumps(plan),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="tmp-paam-", suffix=".part", dir=d)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | os.PathLike, model_fn: Callable[[], nn.Module],
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model: ``model_fn()`` (the dense architecture), the plan, the weights."""
    try:
        payload = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read {os.fspath(path)} as a paam_fast model file: {e}") from e
    except Exception as e:  # unpickling errors of a corrupt or foreign file
        raise ValueError(f"{os.fspath(path)} is not a paam_fast model file ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != PLAN_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a paam_fast model file")
    plan = json.loads(payload["plan"])
    model = model_fn()
    apply_plan(model, plan)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"the weights in {os.fspath(path)} do not fit the model built by "
                         f"model_fn (a different architecture?): {str(e)[:300]}") from e
    return model
