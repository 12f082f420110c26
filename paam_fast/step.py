"""One training step — forward, loss (+ λ·penalty), backward, SGD update — run eagerly or
captured whole, optimizer included, as one CUDA graph.

Small CIFAR networks are launch-bound: a ResNet56 step is ~500 kernels of a few microseconds
each, so replaying the whole step from one graph is what makes an epoch take seconds.  Inside a
capture nothing may touch the host, and the graph replays the exact tensors it recorded, hence:

* each batch is copied into static input buffers (a batch of another shape runs eagerly);
* the learning rate of every param group and λ live in device tensors, filled before every
  replay.  ``torch.optim.SGD`` reads ``lr`` as a Python float (baked into the graph) or calls
  ``.item()`` on a tensor ``lr`` (a sync), so the update is written here (:func:`sgd_update`)
  with foreach ops, reproducing torch's SGD exactly and using its ``optimizer.state``;
* autocast runs with ``cache_enabled=False``;
* the first ``warmup`` steps run eagerly on a side stream (cuBLAS/cuDNN workspaces, momentum
  buffers, DDP buckets), then the next step is captured and replayed; warm-up steps are real
  steps on real batches, so the run's trajectory does not depend on the capture.

Whatever changes the model (a selection event, a compaction, freezing the gates) invalidates the
graph: call :meth:`TrainStep.reset` and the next call re-captures.  ``mode="static"`` runs the
captured code path eagerly, which is how it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainStep", "sgd_update"]

MODES = ("eager", "graph", "static")


@torch.no_grad()
def sgd_update(optimizer: torch.optim.SGD, lrs: list[torch.Tensor]) -> None:
    """``optimizer.step()`` of torch's SGD with each group's learning rate read from the device
    tensor ``lrs[i]``: no host read, so it can be captured in a CUDA graph.  Same update as
    torch (weight decay added to the gradient, momentum buffer cloned from the first gradient,
    dampening, nesterov, maximize) on the optimizer's own ``state`` (checkpoints and compaction
    see the usual ``momentum_buffer``); the last step rounds twice (lr·d, then p − lr·d) where
    torch's ``add_(d, alpha=-lr)`` may round once, so results agree to an ulp, not bitwise."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"whole-step capture supports torch.optim.SGD, got "
                        f"{type(optimizer).__name__}")
    for group, lr in zip(optimizer.param_groups, lrs):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if group.get("maximize", False):
            grads = torch._foreach_neg(grads)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        mom = group["momentum"]
        if mom != 0:
            bufs = []
            for p, g in zip(params, grads):
                st = optimizer.state[p]
                if st.get("momentum_buffer") is None:  # torch: the first buffer is the gradient
                    st["momentum_buffer"] = torch.clone(g).detach()
                    bufs.append(None)
                else:
                    bufs.append(st["momentum_buffer"])
            live = [i for i, b in enumerate(bufs) if b is not None]
            if live:
                lb = [bufs[i] for i in live]
                torch._foreach_mul_(lb, mom)
                torch._foreach_add_(lb, [grads[i] for i in live], alpha=1 - group["dampening"])
            bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
            grads = torch._foreach_add(grads, bufs, alpha=mom) if group["nesterov"] else bufs
        torch._foreach_sub_(params, torch._foreach_mul(grads, lr))
    # what optimizer.step() records, so that LR schedulers know a step was taken
    optimizer._opt_called = True


class TrainStep:
    """``step(x, y) -> (task loss, correct)``: one SGD step of ``model`` on the batch, both
    results 0-dim device tensors (no host sync).  In graph mode they are the graph's static
    outputs, overwritten by the next call: use (or clone) them before calling again.

    Args:
        model: the module to call (may be a DDP or compiled wrapper).
        optimizer: a ``torch.optim.SGD`` (any optimizer in ``mode="eager"``).
        pruner: a :class:`paam_fast.Pruner` whose penalty is added while its gates train.
        amp: bf16 autocast.
        mode: "eager" (plain step, ``optimizer.step()``), "graph" (CUDA graph of the whole
            step) or "static" (the graph's code path run eagerly; for testing).
        warmup: eager steps before the capture (DDP needs 11).
        post_backward: called with no argument after ``loss.backward()``, before the update
            (a peer's regularizer adding to ``.grad``, e.g. Torch-Pruning's ``regularize``);
            eager mode only, since such a callback may read the host.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, pruner=None,
                 amp: bool = False, mode: str = "eager", warmup: int = 3,
                 post_backward: Callable[[], None] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if post_backward is not None and mode != "eager":
            raise ValueError(f"post_backward runs in mode='eager' only, got mode={mode!r}")
        if mode != "eager" and not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"mode={mode!r} needs torch.optim.SGD, got "
                            f"{type(optimizer).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            # at least one eager step: momentum buffers and lazily built state must exist
            # before the capture, or the graph would re-create them on every replay
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        self.model, self.optimizer, self.pruner = model, optimizer, pruner
        self.amp, self.mode, self.warmup = amp, mode, warmup
        self.post_backward = post_backward
        self._lrs: list[torch.Tensor] | None = None
        self._lam: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the captured graph (call after anything changed the model's tensors)."""
        self._graph = None
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gates = None  # the captured forward's gates (what selection reads)
        self._calls = 0
        self._penalised: bool | None = None

    # ---------------------------------------------------------------- the step's body
    def _penalty_on(self) -> bool:
        return self.pruner is not None and self.pruner.active

    def _forward_loss(self, x, y, cache: bool):
        dev = x.device.type
        with torch.autocast(dev, torch.bfloat16, enabled=self.amp, cache_enabled=cache):
            out = self.model(x)
            task = F.cross_entropy(out.float(), y)
        return out, task

    def _eager(self, x, y):
        out, task = self._forward_loss(x, y, cache=True)
        loss = task + self.pruner.penalty() if self._penalty_on() else task
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.post_backward is not None:
            self.post_backward()
        self.optimizer.step()
        return task.detach(), (out.detach().argmax(1) == y).sum()

    def _body(self, x, y):
        """The captured code: device-side λ and learning rates, no host reads."""
        out, task = self._forward_loss(x, y, cache=False)
        loss = task + self.pruner.penalty(lam=self._lam) if self._penalised else task
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sgd_update(self.optimizer, self._lrs)
        return task.detach(), (out.detach().argmax(1) == y).sum()

    def _fill_scalars(self, dev: torch.device) -> None:
        groups = self.optimizer.param_groups
        if self._lrs is None or self._lrs[0].device != dev or len(self._lrs) != len(groups):
            # each lr in its parameters' dtype (float64 models keep a float64 lr); λ scales the
            # fp32 penalty
            dts = [g["params"][0].dtype if g["params"] and g["params"][0].is_floating_point()
                   else torch.float32 for g in groups]
            self._lrs = [torch.zeros((), device=dev, dtype=dt) for dt in dts]
            self._lam = torch.zeros((), device=dev, dtype=torch.float32)
        for t, g in zip(self._lrs, groups):
            t.fill_(float(g["lr"]))
        if self.pruner is not None:
            self._lam.fill_(float(self.pruner.lam))

    # ---------------------------------------------------------------- call
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "eager":
            return self._eager(x, y)
        if self._penalised is not None and self._penalised != self._penalty_on():
            self.reset()  # the gates were frozen: the penalty leaves the graph
        self._penalised = self._penalty_on()
        self._fill_scalars(x.device)
        static = self._static
        if static is None or any(a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
                                 for a, b in zip(static, (x, y))):
            if self._graph is not None:  # an odd batch after the capture: same arithmetic,
                return self._body(x, y)  # run eagerly
            self._static = static = (x.clone(), y.clone())
        static[0].copy_(x)
        static[1].copy_(y)
        self._calls += 1
        if self.mode == "static":
            return self._body(*static)
        if self._graph is None and self._calls <= self.warmup:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                outs = self._body(*static)
            torch.cuda.current_stream(x.device).wait_stream(side)
            return outs
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            # thread_local: a DataLoader's pin-memory thread may call CUDA during the capture
            with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
                self._outs = self._body(*static)
            self._gates = self._controller_gates()
        self._graph.replay()
        if self._gates is not None:
            # A replay runs no Python: point the controller back at the gates the graph
            # rewrites (an evaluation forward since may have left others there).
            self._controller()._last.value = self._gates
        return self._outs

    def _controller(self):
        from .paamify import controller

        return controller(self.model)

    def _controller_gates(self):
        try:
            return self._controller()._last.value
        except ValueError:  # not a paamified model
            return None
