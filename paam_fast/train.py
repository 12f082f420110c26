"""``paam-train``: PAAM's one-stage recipe (and its baselines) on real data, one GPU or many.

    paam-train                                   # embedded default: digits, resnet20, CPU, offline
    paam-train --dataset cifar10 --data ../shared/data/cifar10-jpeg.tar.gz --arch resnet56
    torchrun --nproc_per_node 8 -m paam_fast.train --dataset imagenet --data /imagenet

Methods: ``paam`` (attention scores + penalty + global selection), ``dense`` (same recipe, no
gates), ``slim`` (Network Slimming: L1 on BN γ, then the same selection and compaction),
``uniform`` (every unit thinned to the same fraction from the first step, sized to the same
parameter budget) and ``torch-pruning`` (the peer library's group-norm sparse learning and one
global pruning step to the same budget, :mod:`paam_fast.peers.torch_pruning`; optional,
``pip install torch-pruning==1.6.1``).  The training loop drives :class:`paam_fast.Pruner` (or
the peer).

Outputs in ``--out``: metrics.jsonl, report.json, widths.png / scores.png / curves.png, the
final model (``model.paam``, see :func:`paam_fast.save`), config.json and the checkpoint
(ckpt.pt, written atomically every epoch and at selection; ``--resume`` continues from it).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from . import data as D
from . import fork
from .count import count
from .dist import Dist, all_sum, init_dist
from .export import plan_of, save
from .models import get_model
from .paamify import apply_masks, compact, controller, paamify, param_groups
from .peers import torch_pruning as tp_peer
from .provenance import environment, file_sha256, tensor_digest
from .pruner import Pruner
from .report import report
from .selection import choose, first_alive, random_alive, uniform_alive
from .step import TrainStep
from .train_options import (  # noqa: F401  (build_parser, resolve: the CLI's public names)
    LEGACY_SELECTION,
    RECIPES,
    Recipe,
    UsageError,
    build_parser,
    resolve,
)

__all__ = ["Recipe", "RECIPES", "build_parser", "resolve", "main", "run"]

# --------------------------------------------------------------------------- helpers
def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".part", dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=False, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _retrain_alive(ctrl, spec: dict) -> dict[str, torch.Tensor]:
    """Masks keeping the first w filters of every unit (which ones is immaterial: the thinned
    network is trained from scratch)."""
    widths = {}
    for u in ctrl.units:
        if spec.get("widths"):
            if u.name not in spec["widths"]:
                raise UsageError(f"--retrain {spec['source']}: no width for unit {u.name!r} "
                                 "(another architecture?)")
            w = int(spec["widths"][u.name])
        else:
            row = spec["per_layer"].get(u.producers[0])
            if row is None or row[0] != u.width:
                raise UsageError(f"--retrain {spec['source']}: no width for unit {u.name!r} "
                                 "(another architecture?)")
            w = int(row[1])
        if not (1 <= w <= u.width):
            raise UsageError(f"--retrain: width {w} of unit {u.name!r} is not in [1, {u.width}]")
        widths[u.id] = w
    return first_alive(ctrl.units, widths)


def _reestimate_bn(model: nn.Module, loader, batches: int, dev, args) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches``
    training batches (train-mode forward, no gradient; cumulative average via momentum=None).
    Statistics of dead channels in masked mode stay as they are (the gated BN freezes them).
    Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = None
        m.num_batches_tracked.zero_()  # the first batch then replaces the old statistics
    was_training = model.training
    model.train()
    n = 0
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=args.amp == "bf16"):
        for x, _ in loader:
            if n >= batches:
                break
            x = x.to(dev, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
            n += 1
    for m, (mom, nbt) in zip(bns, saved):
        m.momentum = mom
        m.num_batches_tracked.copy_(nbt + n)
    model.train(was_training)
    return n


def _lr_lambda(args, steps_per_epoch: int):
    r = RECIPES[args.dataset]
    scale = args.epochs / r.epochs
    warm = (round(r.warmup * scale) * steps_per_epoch if args.warmup is None
            else round(args.warmup * steps_per_epoch))
    miles = [round(m * scale) * steps_per_epoch for m in r.milestones]
    total = args.epochs * steps_per_epoch

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if args.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return 0.1 ** sum(step >= m for m in miles)

    return f


class _Data:
    """The run's loaders, whatever the dataset."""

    def __init__(self, args, dev: torch.device, d: Dist):
        self.kind = "tensor"
        self.sampler = None
        self.data_sha256 = file_sha256(args.data) if args.data else None
        if args.dataset in ("digits", "cifar10"):
            if args.dataset == "digits":
                train, test = D.load_digits()
                mean, std, pad, flip = (0.5,) * 3, (0.5,) * 3, 2, False
            else:
                train, test = D.load_cifar10(args.data, args.cache)
                mean, std, pad, flip = D.CIFAR_MEAN, D.CIFAR_STD, 4, True
            self.classes = train.classes
            val = None
            if args.val:
                train, val = D.split_validation(train, args.val)
            if args.subset:
                if args.subset >= len(train):
                    raise UsageError(f"--subset {args.subset} is not below the {len(train)} "
                                     "training images")
                _, train = D.split_validation(train, args.subset)
            kw = {"mean": mean, "std": std, "rank": d.rank, "world": d.world,
                  "channels_last": args.channels_last}
            self.train = D.TensorLoader(train, args.batch_size, dev, train=True, pad=pad,
                                        flip=flip, seed=args.seed, **kw)
            self.test = D.TensorLoader(test, 500, dev, train=False, **kw)
            self.val = D.TensorLoader(val, 500, dev, train=False, **kw) if val else None
            self.input_size = (1, 3, *train.x.shape[1:3])
            self.n_train = len(train)
            self.digests = {"train": tensor_digest(train.x, train.y),
                            "val": tensor_digest(val.x, val.y) if val else None}
        else:
            self.kind = "folder"
            decode = args.decode if args.decode != "auto" else (
                "device" if dev.type == "cuda" else "workers")
            kw = {"decode": decode, "device": dev, "channels_last": args.channels_last}
            tl, el, classes, sampler = D.image_folder_loaders(
                args.data, args.batch_size, args.workers, args.image_size, d.rank, d.world,
                args.seed, args.val, **kw)
            self.train, self.sampler, self.classes = tl, sampler, classes
            self.val = el if args.val else None
            self.test = None if args.val else el
            if args.val:  # the held-out val/ (or test/) folder is the test set
                _, self.test, _, _ = D.image_folder_loaders(
                    args.data, args.batch_size, args.workers, args.image_size, d.rank, d.world,
                    args.seed, None, **kw)
            self.input_size = (1, 3, args.image_size, args.image_size)
            self.n_train = len(tl.dataset)
            self.digests = {"train": None, "val": None}  # not hashed: ImageNet-sized

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.train, "set_epoch"):  # TensorLoader, DeviceDecodeLoader
            self.train.set_epoch(epoch)
        else:
            self.sampler.set_epoch(epoch)


def _evaluate(model, loader, dev, args, d: Dist) -> float:
    model.eval()
    correct = torch.zeros((), device=dev, dtype=torch.float64)
    total = torch.zeros((), device=dev, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=args.amp == "bf16"):
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == y).sum()
            total += y.numel()
    all_sum(correct, d)
    all_sum(total, d)
    return float(correct / total.clamp_min(1))


def _widths(model) -> dict[str, int]:
    ctrl = controller(model)
    if ctrl.compacted:
        return {u.name: len(ctrl.kept[u.id]) for u in ctrl.units}
    return {u.name: int(m.sum()) for u, m in zip(ctrl.units, ctrl.masks())}


# --------------------------------------------------------------------------- the run
class Run:
    """One training run: model, optimizer, pruner, loaders; checkpoints and outputs."""

    def __init__(self, args: argparse.Namespace, d: Dist) -> None:
        self.args, self.d = args, d
        self.commit = _commit()  # the code this run starts with (HEAD may move while it runs)
        self.dev = torch.device(args.device if not args.device.startswith("cuda") or d.world == 1
                                else f"cuda:{d.local_rank}")
        self.data = _Data(args, self.dev, d)
        torch.manual_seed(args.seed)
        model = get_model(args.arch, num_classes=len(self.data.classes))
        self.gated = args.method not in ("dense", "torch-pruning")
        if self.gated:
            paamify(model, coupling=args.coupling, dim=args.dim, leak=args.leak,
                    normalize=args.normalize, input_size=self.data.input_size,
                    scorer="bn" if args.method == "slim" else "attention",
                    init_bias=args.init_bias, residual=args.scorer_residual)
        self.model = model.to(self.dev)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.latency = None
        if self.gated and "latency" in (args.select_cost, args.cost):
            self.latency = self._latency_table()  # on the dense network, before any thinning
        self.dense_counts = self._counts()
        self.dense_widths = {n: m.out_channels for n, m in self.model.named_modules()
                             if isinstance(m, nn.Conv2d)}
        self.peer = None
        if args.method == "torch-pruning":
            try:
                self.peer = tp_peer.TorchPruningPeer(
                    self.model, input_size=self.data.input_size, epochs=args.epochs,
                    keep=args.keep, select_cost=args.select_cost,
                    select_epoch=args.select_epoch, reg=args.lam, round_to=args.round_to,
                    scope=args.tp_scope)
            except tp_peer.MissingTorchPruning as e:  # a --resume of such a run
                raise UsageError(str(e)) from None
        if args.method in ("uniform", "random"):  # thinned from the first step, trained as is
            ctrl = controller(self.model)
            try:
                alive = (uniform_alive(ctrl.units, ctrl.structure, args.keep, args.select_cost,
                                       args.round_to, latency=self.latency)
                         if args.method == "uniform" else
                         random_alive(ctrl.units, ctrl.structure, args.keep, args.select_cost,
                                      args.round_to, seed=args.seed, latency=self.latency))
            except ValueError as e:
                raise UsageError(f"--keep {args.keep} (of --select-cost {args.select_cost}): "
                                 f"{e}") from None
            apply_masks(self.model, alive)
            compact(self.model)
        elif args.method == "retrain":  # a PAAM run's widths, thinned and trained as uniform is
            ctrl = controller(self.model)
            apply_masks(self.model, _retrain_alive(ctrl, args.retrain_widths))
            compact(self.model)
        self.optimizer = torch.optim.SGD(self._groups(), lr=args.lr, momentum=0.9)
        self.steps_per_epoch = len(self.data.train)
        f = _lr_lambda(args, self.steps_per_epoch)
        lambdas = [f] * len(self.optimizer.param_groups)
        if args.score_warmup > 0:  # the scoring networks' group ramps from 0
            ramp = max(1, round(args.score_warmup * self.steps_per_epoch))
            lambdas = [(lambda step, _f=f, _r=ramp: _f(step) * min(1.0, (step + 1) / _r))
                       if g.get("name") == "paam" else f for g in self.optimizer.param_groups]
        self._lr_lambdas = lambdas
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        self.pruner = None
        if args.method in ("paam", "slim") and args.keep is not None:
            self._check_budget()
        if args.method in ("paam", "slim"):
            self.pruner = Pruner(self.model, self.optimizer, epochs=args.epochs, lam=args.lam,
                                 keep=args.keep, mass=args.mass, target=args.target,
                                 cost=args.cost if args.method == "paam" else "uniform",
                                 select_cost=args.select_cost, select_epoch=args.select_epoch,
                                 final_epoch=args.final_epoch,
                                 after_select=args.after_select if args.method == "paam"
                                 else "compact", steps=args.steps, min_keep=args.min_keep,
                                 round_to=args.round_to,
                                 balance=args.penalty_balance if args.method == "paam"
                                 else "filter", select_key=args.select_key,
                                 select_beta=args.select_beta,
                                 select_allocation=args.select_allocation,
                                 latency=self.latency,
                                 importance=(self._taylor_importance
                                             if args.select_key == "taylor" else None),
                                 measure=self._measured_ratio if args.latency_verify else None,
                                 verify_iters=args.latency_verify)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.score_hist: list[dict] = []
        self._wrap()

    def _check_budget(self) -> None:
        """Refuse, before any training, a budget the selection could never meet (the parts no
        selection removes, or every unit's floor, already over it): whether it can depends on
        the network's counts, not on the scores, so any gates will do."""
        args, ctrl = self.args, controller(self.model)
        try:
            choose(ctrl.units, [torch.ones(u.width) for u in ctrl.units], ctrl.masks(),
                   ctrl.structure, ctrl.widths(), keep=args.keep, cost=args.select_cost,
                   min_keep=args.min_keep, round_to=args.round_to, latency=self.latency)
        except ValueError as e:
            raise UsageError(f"--keep {args.keep} (of --select-cost {args.select_cost}): "
                             f"{e}") from None

    def _latency_table(self):
        """The run's latency table: --latency-table, the one this run saved (a resume), or one
        measured now on the training device (rank 0; other ranks read its file), saved in --out
        as latency_table.json."""
        from .latency import LatencyTable, latency_table

        args = self.args
        ctrl = controller(self.model)
        path = os.path.join(args.out, "latency_table.json")
        src = args.latency_table or (path if args.resume and os.path.exists(path) else None)
        if src is None and self.d.main:
            table = latency_table(self.model, self.data.input_size, batch=args.latency_batch,
                                  device=self.dev,
                                  dtype=torch.bfloat16 if args.amp == "bf16" else torch.float32,
                                  channels_last=args.channels_last, progress=not args.quiet,
                                  fit=args.latency_fit, round_to=args.round_to)
            table.save(path)
            if not args.quiet:
                print(table.describe(), flush=True)
            src = path
        if self.d.world > 1:
            import torch.distributed as dist

            dist.barrier()
            src = src or path
        try:
            table = LatencyTable.load(src, ctrl.structure)
        except ValueError as e:
            raise UsageError(f"--latency-table {src}: {e}") from e
        if self.d.main and os.path.abspath(src) != os.path.abspath(path):
            table.save(path)
        return table

    def _measured_ratio(self, model) -> float:
        """The masked ``model`` exported and measured against a fresh dense network, side by
        side, as the latency table measures (--latency-verify)."""
        from .export import export
        from .measured_budget import measured_ratio

        dense = get_model(self.args.arch, num_classes=len(self.data.classes))
        return measured_ratio(self.latency, dense, export(model), self.dev)

    def _latency_report(self) -> dict:
        """The exported network's latency: the table's prediction, and measured beside a fresh
        dense network, interleaved, with the table's batch, dtype and memory format."""
        from .export import export
        from .latency import measure_like, predict_ms

        table = self.latency
        dense = get_model(self.args.arch, num_classes=len(self.data.classes))
        got = measure_like(table, {"dense": dense, "final": export(self.model)}, self.dev)
        pred = predict_ms(self.model, table)
        meas, dense_ms = got["final"]["median_ms"], got["dense"]["median_ms"]
        return {"table": os.path.join(self.args.out, "latency_table.json"),
                "device": table.meta["device"], "batch": table.meta["batch"],
                "dtype": table.meta["dtype"], "threads": torch.get_num_threads(),
                "predicted_ms": pred, "measured_ms": meas, "error": meas / pred - 1,
                "measured_p20_p80_ms": [got["final"]["p20_ms"], got["final"]["p80_ms"]],
                "dense_table_ms": table.dense_ms, "dense_measured_ms": dense_ms,
                "ratio_to_dense_predicted": pred / table.dense_ms,
                "ratio_to_dense_measured": meas / dense_ms, "table_check": table.check,
                # --latency-verify: every budget tried at the cut, as measured then
                "measured_budget": next((e["measured_budget"] for h in reversed(self.history)
                                         for e in h.get("events", ())
                                         if "measured_budget" in e), None)}

    # ---- model wrappers (DDP, compile, CUDA graphs): rebuilt after every compaction
    def _wrap(self) -> None:
        self.step_model = self.model
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dev.index] if self.dev.type == "cuda" else None
            self.step_model = DDP(self.model, device_ids=ids,
                                  find_unused_parameters=False)
        if self.args.compile:
            self.step_model = torch.compile(self.step_model)
        # --cuda-graphs: the whole step (forward, backward, SGD update) replays as one graph,
        # captured anew after each rebuild; DDP needs 11 eager steps before its capture
        self.step = TrainStep(self.step_model, self.optimizer, pruner=self.pruner,
                              amp=self.args.amp == "bf16",
                              mode="graph" if self.args.cuda_graphs else "eager",
                              warmup=11 if self.d.world > 1 else 3,
                              post_backward=(self.peer.regularize
                                             if self.peer is not None and self.peer.active
                                             else None))

    def _after_peer_pruning(self) -> None:
        """Torch-Pruning replaced the pruned layers' parameters with new, smaller tensors: a
        new SGD over them, with the same parameter groups and hyperparameters, and the
        scheduler kept at its step (its state carried over, the learning rates set from it).
        The momentum buffers start afresh: Torch-Pruning slices weights and gradients, not
        optimizer state (PAAM's compaction slices them; here that would be code of ours inside
        the peer's method)."""
        if self.args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        sched = self.scheduler.state_dict()
        self.optimizer = torch.optim.SGD(self._groups(), lr=self.args.lr, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambdas)
        self.scheduler.load_state_dict(sched)
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr

    def _groups(self):
        wd = self.args.weight_decay
        if self.gated:
            scale = self.args.score_lr_scale
            return param_groups(self.model, weight_decay=wd,
                                score_lr=None if scale == 1.0 else self.args.lr * scale)
        return [{"params": list(self.model.parameters()), "weight_decay": wd, "name": "net"}]

    def _counts(self) -> dict[str, int]:
        return count(self.model, self.data.input_size)

    # ---- checkpoints
    def ckpt_path(self) -> str:
        return os.path.join(self.args.out, "ckpt.pt")

    def save_checkpoint(self, path: str | None = None, **extra) -> None:
        if not self.d.main:
            return
        _atomic_write(path or self.ckpt_path(), lambda p: torch.save({**self._state(), **extra},
                                                                     p))

    def _state(self) -> dict:
        return {
            "epoch": self.epoch, "global_step": self.global_step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner else None,
            "peer": json.dumps(self.peer.state_dict()) if self.peer else None,
            "plan": json.dumps(plan_of(self.model)) if self.gated else None,
            "compacted": bool(self.gated and controller(self.model).compacted),
            "history": json.dumps(self.history), "score_hist": json.dumps(self.score_hist),
            "digests": json.dumps(self.data.digests),
        }

    def load_checkpoint(self) -> bool:
        path = self.ckpt_path()
        if not os.path.exists(path):
            return False
        self._restore(torch.load(path, map_location=self.dev, weights_only=True))
        return True

    def fork_from(self, run_dir: str) -> tuple[float, float]:
        """Start from another run's pre-selection state (:mod:`paam_fast.fork`); returns the
        (loss, accuracy) of its last joint epoch, whose end (the selection) is still to run."""
        st = fork.load(run_dir, self.dev)
        if "digests" in st and json.loads(st["digests"]) != self.data.digests:
            raise fork.ForkError(f"--fork-from {run_dir}: its training/validation images differ "
                                 "from this run's")
        self._restore(st)
        if st["last_gates"]:
            controller(self.model)._last.value = list(st["last_gates"])
        if self.d.main:  # the joint phase's epochs, so this run's log is complete
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)
        return float(st["last_loss"]), float(st["last_acc"])

    def _restore(self, st: dict) -> None:
        if st["compacted"] and not controller(self.model).compacted:
            # restore the plan before the state: masks, frozen gates, physical widths
            plan = json.loads(st["plan"])
            ctrl = controller(self.model)
            alive = {}
            for sp in plan["spaces"]:
                m = torch.zeros(sp["dense"], dtype=torch.bool)
                m[sp["keep"]] = True
                alive[sp["name"]] = m
            apply_masks(self.model, alive)
            compact(self.model, self.optimizer)
            assert ctrl.compacted
        if self.peer is not None and st.get("peer"):
            was = self.peer.pruned
            self.peer.load_state_dict(json.loads(st["peer"]))  # replays its pruning history
            if self.peer.pruned and not was:
                self._after_peer_pruning()  # an optimizer over the pruned parameters
        self.model.load_state_dict(st["model"])  # masks included (re-applied by a hook)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.pruner and st["pruner"]:
            self.pruner.load_state_dict(st["pruner"])
        self.epoch, self.global_step = st["epoch"], st["global_step"]
        self.history = json.loads(st["history"])
        self.score_hist = json.loads(st["score_hist"])
        self._wrap()

    # ---- training
    def train_epoch(self, bar) -> tuple[float, float, bool]:
        args, dev = self.args, self.dev
        self.step_model.train()
        self.data.set_epoch(self.epoch)
        torch.manual_seed(args.seed * 1000003 + self.epoch)  # dropout etc.: replayable epochs
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.float64)
        seen = 0
        for x, y in self.data.train:
            if args.max_steps is not None and self.global_step >= args.max_steps:
                return float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1), True
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            task, right = self.step(x, y)
            self.scheduler.step()
            self.global_step += 1
            loss_sum += task * y.numel()
            correct += right
            seen += y.numel()
            if bar is not None:
                bar.update(1)
        tot = torch.tensor([seen], device=dev, dtype=torch.float64)
        all_sum(tot, self.d)
        all_sum(loss_sum, self.d)
        all_sum(correct, self.d)
        return float(loss_sum / tot), float(correct / tot), False

    def _taylor_importance(self) -> list[torch.Tensor]:
        """The Taylor key's values (:mod:`paam_fast.selection.taylor`) on the first
        --taylor-batches batches of this epoch's training order; under DDP each rank measures
        its own shard and the values are averaged, so every replica selects the same."""
        from .selection.taylor import taylor_importance

        batches = itertools.islice(iter(self.data.train), self.args.taylor_batches)
        with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.args.amp == "bf16"):
            imp = taylor_importance(self.model, batches, channels_last=self.args.channels_last)
        if self.d.world > 1:
            imp = [all_sum(v, self.d).div_(self.d.world) for v in imp]
        return imp

    def recalibrate_bn(self) -> int:
        """Re-estimate BN running statistics on --bn-reestimate training batches; under DDP
        every rank saw its own shard, so the statistics are averaged and replicas agree."""
        n = _reestimate_bn(self.model, self.data.train, self.args.bn_reestimate, self.dev,
                           self.args)
        if self.d.world > 1:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    for buf in (m.running_mean, m.running_var):
                        all_sum(buf, self.d).div_(self.d.world)
        return n

    def at_selection(self) -> bool:
        """The epoch just trained is the last of the joint phase: its end selects."""
        return (self.pruner is not None and self.pruner.events_done == 0
                and self.epoch + 1 == self.pruner.select_epoch)

    def save_presel(self, loss: float, acc: float) -> None:
        """The state a fork starts from: the joint phase done, the selection not yet (with the
        last forward's gates, which the selection ranks)."""
        ctrl = controller(self.model)
        last = ctrl._last.value
        names = [[ctrl.units[i].name for i in idx] for idx in ctrl.group_units]
        self.save_checkpoint(fork.presel_path(self.args.out), last_loss=loss, last_acc=acc,
                             last_gates=[g.detach().clone() for g in last or []],
                             last_gate_units=json.dumps(names))

    def epoch_end(self, loss: float, acc: float, t0: float) -> list[dict]:
        if self.at_selection():
            self.save_presel(loss, acc)
        events = (self.pruner.epoch_end(self.epoch) if self.pruner is not None
                  else self.peer.epoch_end(self.epoch) if self.peer is not None else [])
        if self.peer is not None and any(e["event"] == "compact" for e in events):
            self._after_peer_pruning()
        if any(e["event"] in ("select", "compact") for e in events):
            self._wrap()  # new masks or parameters: DDP buckets, compiled code, CUDA graph
        ev_loader = self.data.val if self.data.val is not None else self.data.test
        acc_eval = _evaluate(self.step_model, ev_loader, self.dev, self.args, self.d)
        bn = {}
        if self.args.bn_reestimate > 0 and any(e["event"] in ("select", "compact")
                                               for e in events):
            # The running statistics are the dense network's: a selection or compaction changes
            # what every later BN sees, so the figure measured with them is not the new
            # network's.  Both are logged; "eval_acc" is the re-estimated one.
            n = self.recalibrate_bn()
            bn = {"eval_acc_before_bn": acc_eval, "bn_reestimate_batches": n}
            acc_eval = _evaluate(self.step_model, ev_loader, self.dev, self.args, self.d)
        rec = {"epoch": self.epoch, "loss": loss, "train_acc": acc, **bn,
               "eval_acc": acc_eval, "eval_split": "val" if self.data.val is not None else "test",
               "lr": self.optimizer.param_groups[0]["lr"],
               "lam": (self.pruner.lam if self.pruner else self.peer.reg if self.peer
                       else None),
               "epoch_s": time.time() - t0}
        if self.gated:
            now = self._counts()
            rec["kept_fraction"] = now["params"] / self.dense_counts["params"]
            rec["per_layer"] = _widths(self.model)
            ctrl = controller(self.model)
            if ctrl.scorer == "attention" and not ctrl.frozen and ctrl._last.value is not None:
                g = torch.cat([v[v > 0] for v in ctrl.unit_gates()]).float().cpu()
                hist = torch.histc(g, bins=20, min=0.0, max=1.0)
                self.score_hist.append({"epoch": self.epoch, "hist": hist.tolist()})
        elif self.peer is not None:
            rec["kept_fraction"] = self._counts()["params"] / self.dense_counts["params"]
            rec["per_layer"] = self.peer.widths()
        else:
            rec["kept_fraction"] = 1.0
        rec["events"] = [{k: v for k, v in e.items() if k != "widths"} for e in events]
        self.history.append(rec)
        if self.d.main:
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.epoch += 1
        self.save_checkpoint()
        return events

    def finish(self, wall_s: float) -> dict:
        args = self.args

        def evaluate() -> tuple[float, float | None]:
            top1 = _evaluate(self.step_model, self.data.test, self.dev, args, self.d)
            val1 = (_evaluate(self.step_model, self.data.val, self.dev, args, self.d)
                    if self.data.val is not None else None)
            return top1, val1

        before = {}
        if args.bn_reestimate > 0:
            # The running statistics are an EMA over the last ~1/momentum batches, which lags a
            # network that still changed over them (short runs: the 2-epoch embedded default
            # scores 68.8% with them, 83.0% re-estimated); the same for every method.
            top1, val1 = evaluate()
            before = {"top1_before_bn": top1, "val_top1_before_bn": val1,
                      "bn_reestimate_batches": self.recalibrate_bn()}
        top1, val1 = evaluate()
        final = self._counts()
        if self.gated:
            rep = report(self.model)
            per_layer = [{"name": r["name"], "filters_dense": r["filters_dense"],
                          "filters_final": r["filters_final"]} for r in rep.rows]
            text = str(rep)
        else:
            per_layer = [{"name": n, "filters_dense": self.dense_widths.get(n, m.out_channels),
                          "filters_final": m.out_channels}
                         for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)]
            text = "\n".join(f"{r['name']}: {r['filters_final']}" for r in per_layer)
        epoch_s = [h["epoch_s"] for h in self.history]
        rep_json = {
            "arch": args.arch, "dataset": args.dataset, "method": args.method,
            "epochs": args.epochs, "top1": top1, "val_top1": val1, **before,
            "params_dense": self.dense_counts["params"], "params_final": final["params"],
            "flops_dense": self.dense_counts["flops"], "flops_final": final["flops"],
            "per_layer": per_layer, "wall_s": wall_s,
            "widths": _widths(self.model) if self.gated else None,
            "retrain_from": (args.retrain_widths["source"] if args.method == "retrain"
                             else None),
            "epoch_s_median": sorted(epoch_s)[len(epoch_s) // 2] if epoch_s else None,
            "device": (torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda"
                       else "cpu"),
            "world_size": self.d.world, "torch": torch.__version__, "commit": self.commit,
            "seed": args.seed, "config": {k: v for k, v in vars(args).items()},
            "command": " ".join(sys.argv), "environment": environment(),
            "data_sha256": self.data.data_sha256, "n_train": self.data.n_train,
            "split_digest": self.data.digests,
        }
        if self.peer is not None:
            # what rebuilds the pruned network: the dense one, then this history replayed
            rep_json["torch_pruning"] = {"version": tp_peer.version(), **self.peer.state_dict()}
        if self.latency is not None and self.d.main:
            rep_json["latency"] = self._latency_report()
        if self.d.main:
            with open(os.path.join(args.out, "report.json"), "w") as f:
                json.dump(rep_json, f, indent=2)
            if self.gated:
                save(self.model, os.path.join(args.out, "model.paam"))
            else:
                torch.save({"format": "paam_fast.plan/1",
                            "plan": json.dumps({"format": "paam_fast.plan/1", "spaces": []}),
                            "state_dict": self.model.state_dict()},
                           os.path.join(args.out, "model.paam"))
            from .plots import write_plots

            write_plots(args.out, per_layer, self.history, self.score_hist)
            print(text)
            print(f"top-1 {top1:.2%} (test)" + (f", {val1:.2%} (val)" if val1 is not None
                                                 else "")
                  + f"; params {self.dense_counts['params']:,} -> {final['params']:,}; "
                  f"MACs {self.dense_counts['flops']:,} -> {final['flops']:,}; "
                  f"{wall_s:.0f} s; outputs in {args.out}")
        if self.d.world > 1:
            digest = hashlib.sha256()
            for k, v in sorted(self.model.state_dict().items()):
                digest.update(k.encode())
                digest.update(v.detach().cpu().contiguous().numpy().tobytes())
            with open(os.path.join(args.out, f"digest_rank{self.d.rank}.json"), "w") as f:
                json.dump({"rank": self.d.rank, "weights_sha256": digest.hexdigest(),
                           "widths": _widths(self.model) if self.gated else None}, f)
        return rep_json


def _prepare_out(args, d: Dist) -> bool:
    """Check and create --out; True if this call created it (a failed start removes it)."""
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("runs", f"{args.dataset}-{args.arch}-{args.method}-{stamp}")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        raise UsageError(f"--out {args.out} already holds a run; pass --resume to continue it "
                         "or choose another folder")
    created = not os.path.exists(args.out)
    if d.main:
        os.makedirs(args.out, exist_ok=True)
    return created


def _start(args, d: Dist, created: bool) -> Run:
    """Build the run (data, model, optimizer), then write config.json.  A start that fails
    (bad data, an unbuildable model) leaves no folder behind that would block its rerun."""
    try:
        r = Run(args, d)
    except BaseException:
        if created and d.main and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    if d.main and not args.resume:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    return r


def _event_text(events: list[dict]) -> str:
    return "".join(f"; {e['event']}" + (f" {e['params']:,} params" if "params" in e else "")
                   for e in events if e["event"] != "lambda")


def run(args: argparse.Namespace) -> dict | None:
    """Run training as configured; returns the report dict (None if stopped by --max-steps)."""
    if args.cuda_graphs and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # NCCL's watchdog must not query events inside a capture (PyTorch's CUDA-graph notes)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    d = init_dist(args.device)
    try:
        created = _prepare_out(args, d)
        if d.world > 1:
            import torch.distributed as dist

            dist.barrier()
        cfg_path = os.path.join(args.out, "config.json")
        if args.resume and os.path.exists(cfg_path):
            with open(cfg_path) as f:
                saved = json.load(f)
            keep = {k: getattr(args, k) for k in ("out", "resume", "max_steps", "quiet",
                                                  "stop_at_selection")}
            # options added since the run started take their defaults
            missing = {k: LEGACY_SELECTION.get(k, v) for k, v in vars(args).items()
                       if k not in saved}
            args = argparse.Namespace(**{**missing, **saved, **keep})
        t_start = time.time()
        r = _start(args, d, created)
        if args.resume and r.load_checkpoint():
            if d.main:
                print(f"resumed {args.out} at epoch {r.epoch}")
        elif args.fork_from:
            loss, acc = r.fork_from(args.fork_from)
            events = r.epoch_end(loss, acc, time.time())  # the selection, by this run's rule
            if d.main and not args.quiet:
                print(f"forked from {args.fork_from} at epoch {r.epoch}: "
                      f"{_event_text(events)}", flush=True)
        bar_cls = None
        # progress bars on a terminal only: in a log every redraw would be a line
        if not args.quiet and d.main and sys.stderr.isatty():
            from tqdm import tqdm

            bar_cls = tqdm
        while r.epoch < args.epochs:
            t0 = time.time()
            bar = bar_cls(total=r.steps_per_epoch, desc=f"epoch {r.epoch + 1}/{args.epochs}",
                          leave=False) if bar_cls else None
            loss, acc, stopped = r.train_epoch(bar)
            if bar is not None:
                bar.close()
            if stopped:
                if d.main:
                    print(f"stopped after {r.global_step} steps (--max-steps); the last "
                          f"checkpoint is epoch {r.epoch}: continue with --resume --out {args.out}")
                return None
            if args.stop_at_selection and r.at_selection():
                r.save_presel(loss, acc)
                if d.main:
                    print(f"stopped at the selection (--stop-at-selection) after epoch "
                          f"{r.epoch + 1}: fork from it with --fork-from {args.out}, or run "
                          f"on with --resume --out {args.out}")
                return None
            events = r.epoch_end(loss, acc, t0)
            h = r.history[-1]
            if d.main and not args.quiet:
                extra = _event_text(events)
                print(f"epoch {h['epoch'] + 1}/{args.epochs}: loss {loss:.4f}, train "
                      f"{acc:.2%}, {h['eval_split']} {h['eval_acc']:.2%}, kept "
                      f"{h['kept_fraction']:.1%}{extra} ({h['epoch_s']:.1f} s)", flush=True)
        return r.finish(time.time() - t_start)
    finally:
        if d.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve(args)
        run(args)
    except (UsageError, D.DataError, fork.ForkError) as e:
        print(f"paam-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

