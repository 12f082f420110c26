"""``paam-train``'s command line: the recipes, the flags, their checks and the defaults they
resolve to (:func:`resolve`).  Everything here runs before any data or model is touched, so a
bad command line is exit 2 with a message naming the option, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import torch

from . import data as D
from . import fork
from .models import CIFAR_ARCHS, TORCHVISION_ARCHS
from .paamify import default_init_bias
from .peers import torch_pruning as tp_peer
from .pruner import DEFAULT_LAMBDA

__all__ = ["ARCHS", "Recipe", "RECIPES", "UsageError", "build_parser", "resolve",
           "LEGACY_SELECTION"]

ARCHS = sorted(CIFAR_ARCHS) + list(TORCHVISION_ARCHS)


@dataclass(frozen=True)
class Recipe:
    """A dataset's default training recipe (PAAM_METHOD.md §6).  ``milestones``: epochs (of
    ``epochs``) where the lr is multiplied by 0.1; they and ``warmup`` scale with --epochs."""

    arch: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup: int
    milestones: tuple[int, ...]
    round_to: int = 8


RECIPES = {
    # The embedded default: small enough for 2 CPU cores in a few minutes.
    "digits": Recipe("resnet20", 30, 64, 0.05, 0.9, 1e-4, 1, (20, 26), round_to=1),
    "cifar10": Recipe("resnet56", 182, 128, 0.1, 0.9, 1e-4, 5, (91, 136)),
    "imagenet": Recipe("resnet50", 90, 256, 0.1, 0.9, 1e-4, 5, (30, 60, 80)),
    "imagefolder": Recipe("resnet18", 90, 256, 0.1, 0.9, 1e-4, 5, (30, 60, 80)),
}
DEFAULT_SLIM_LAMBDA = 1e-4  # Liu et al. 2017's sparsity coefficient for CIFAR


class UsageError(Exception):
    """A bad command line or bad data: message to stderr, exit code 2."""


# --------------------------------------------------------------------------- command line
def _fraction(s: str) -> float:
    v = float(s)
    if not (0 < v <= 1):
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {s}")
    return v


def _val(s: str) -> float | int:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {s}")
    return int(v) if v >= 1 else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paam-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a CNN with PAAM (or a baseline) and prune it in the same run. With no "
                    "arguments: the embedded default (digits, resnet20, offline, a few minutes on "
                    "2 CPU cores). Defaults marked 'recipe' come from the dataset's recipe.")
    a = p.add_argument
    a("--arch", default=None, help=f"network: {', '.join(ARCHS)} (recipe: digits resnet20, "
      "cifar10 resnet56, imagenet resnet50, imagefolder resnet18)")
    a("--dataset", default="digits", choices=sorted(RECIPES),
      help="digits: scikit-learn's handwritten digits, shipped offline (the embedded default); "
           "cifar10: --data as a JPEG tar/ImageFolder/torchvision binary folder; imagenet and "
           "imagefolder: an ImageFolder tree with train/ and val/ (or test/)")
    a("--data", default=None, help="path of the dataset (not used by digits)\n" + D.LAYOUTS)
    a("--method", default="paam",
      choices=["paam", "dense", "slim", "uniform", "random", "retrain", "torch-pruning"],
      help="paam; dense (no pruning); slim (Network Slimming: L1 on BN γ, same selection); "
           "uniform (every unit thinned to the same fraction from the start, same budget); "
           "random (every unit thinned to its own random share, seeded by --seed, scaled to "
           "the same budget: a control); "
           "retrain (set by --retrain); torch-pruning (Torch-Pruning's group-norm sparse "
           "learning, then one global pruning step to the --keep budget at --select-epoch; "
           f"needs {tp_peer.INSTALL})")
    a("--retrain", default=None, metavar="RUN", help="train the widths that a finished PAAM (or "
      "slim) run selected from scratch, with this recipe, as --method uniform trains its thinned "
      "network (ours, not the paper's): RUN is that run's folder or its report.json")
    a("--epochs", type=int, default=None, help="total epochs (recipe)")
    a("--batch-size", type=int, default=None, help="batch size per process (recipe)")
    a("--lr", type=float, default=None, help="peak learning rate (recipe), SGD momentum 0.9")
    a("--weight-decay", type=float, default=None, help="weight decay of the network (recipe); "
      "none on the scoring networks")
    a("--score-lr-scale", type=float, default=1.0, help="the scoring networks' learning rate as a "
      "multiple of --lr (same schedule)")
    a("--score-warmup", type=float, default=0.0, help="epochs over which the scoring networks' "
      "learning rate ramps linearly from 0 (on top of the schedule; ours)")
    a("--warmup", type=float, default=None, help="epochs of linear learning-rate warm-up "
      "(recipe: its warm-up scaled to --epochs and rounded, so none in short runs)")
    a("--schedule", default="step", choices=["step", "cosine"],
      help="step: ×0.1 at the recipe's milestones scaled to --epochs; cosine: to 0")
    a("--lam", type=float, default=None, help=f"λ, the penalty coefficient (paam default "
      f"{DEFAULT_LAMBDA}, slim default {DEFAULT_SLIM_LAMBDA}, torch-pruning: its reg, default "
      f"{tp_peer.DEFAULT_REG})")
    a("--target", type=_fraction, default=None, help="fraction of params (or --select-cost) to "
      "keep, reached by adjusting λ each epoch so mass selection lands on it")
    a("--select-epoch", type=int, default=None, help="E_sel: epochs trained before selection "
      "(default 30%% of --epochs)")
    a("--final-epoch", type=int, default=None, help="E_final of masked mode (default 50%%)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=float, default=None, help="budget mode: fraction (0, 1] of the "
                   "dense model's --select-cost to keep (default 0.5 when no --mass/--target)")
    g.add_argument("--mass", type=_fraction, default=None, help="mass mode: keep the shortest "
                   "prefix of gates summing to this fraction")
    a("--cost", default="uniform", choices=["uniform", "params", "flops", "latency"],
      help="per-filter cost in the penalty (latency: a filter's ms in the latency table's timed "
           "layers)")
    a("--select-cost", default=None, choices=["params", "flops", "latency", "params+flops"],
      help="what --keep and --target are fractions of (params+flops: both at once, the network "
           "at most that fraction of dense in parameters and in MACs; default params+flops for "
           "paam, uniform and random with a --keep budget, params otherwise; paam's default "
           "selection is then --select-key taylor --select-beta 1, value per joint cost (with "
           "--select-cost flops: value per MAC), chosen on paired seeds (RESULTS.md); the "
           "paper-literal selection is --select-key gate "
           "--select-cost params --select-beta 0; latency: the dense "
           "network's latency "
           "predicted by a table measured on the training device at the start, or read from "
           "--latency-table; saved in --out as latency_table.json)")
    a("--latency-table", default=None, metavar="FILE", help="a latency table (paam_fast.latency) "
      "of this model on this device, instead of measuring one at the start")
    a("--latency-batch", type=int, default=1, help="the batch size the latency table is "
      "measured at (the inference batch a latency budget is for)")
    a("--latency-fit", default="curve", choices=["rest", "scale", "curve"], help="how a "
      "measured latency table turns its layers into the network's latency: rest = dense minus "
      "the layers' sum is fixed; scale = fixed and a scale fitted to the dense and half-width "
      "networks (ours); curve = piecewise linear through the dense, three-quarter-, half-, "
      "three-eighths-, quarter- and eighth-width networks (ours, the default; "
      "paam_fast.latency)")
    a("--latency-verify", type=int, default=0, metavar="N", help="meet --keep of the latency "
      "as measured: the pruned network is measured against dense on this device at the cut and, "
      "while over --keep, cut again at a budget scaled by keep / its measured ratio, at most N "
      "times (paam_fast.measured_budget; with --select-cost latency and --keep)")
    a("--select-key", default=None, choices=["gate", "unit_mean", "taylor"],
      help="what selection ranks filters by (ours): gate = g; unit_mean = g / its unit's mean g "
           "(comparable across units of different widths); taylor = |g·dL/dg| over "
           "--taylor-batches training batches (the filter's first-order effect on the loss). "
           "Default: taylor for paam with a --keep budget in params+flops or flops, gate otherwise")
    a("--taylor-batches", type=int, default=20, help="training batches the Taylor key "
      "averages over at selection (--select-key taylor)")
    a("--select-beta", type=float, default=None, help="divide the selection key by each "
      "filter's cost (in --select-cost) to this power (ours): 0 = the key itself, 1 = value per "
      "cost (default 1 for paam with a --keep budget in params+flops or flops, 0 otherwise)")
    a("--select-allocation", default="global", choices=["global", "uniform"],
      help="global: one ranking over all units sets the widths (PAAM); uniform: the uniform "
           "baseline's widths, each unit keeping its own best filters (a control, ours)")
    a("--min-keep", type=float, default=0.05, help="every unit keeps ≥ max(1, ⌈min_keep·F⌉)")
    a("--round-to", type=int, default=None, help="round kept widths up to multiples of this "
      "(recipe: 8; digits 1)")
    a("--coupling", default="internal", choices=["internal", "grouped"],
      help="internal: gate channels feeding no residual add; grouped: tie them across adds")
    a("--tp-scope", default="all", choices=["all", "internal"],
      help="--method torch-pruning: all (every coupled group it finds, the residual stages "
           "too: Torch-Pruning as published) or internal (only the channels PAAM's internal "
           "coupling gates: the same units as PAAM's default, a control, ours)")
    a("--normalize", default="max", choices=["max", "none"],
      help="gate g = s / max s (scale-free) or g = s (paper-literal)")
    a("--dim", type=int, default=32, help="attention width d of the scoring network")
    a("--leak", type=float, default=0.01, help="slope α of the leaky-exp above 0")
    a("--init-bias", type=float, default=None, help="b0, the scoring head's starting bias (ours; "
      "default -2 with --normalize max, 0 with none): with --normalize max the start is exactly "
      "dense for any b0; b0 < 0 starts every filter on the leaky-exp's exp branch instead of "
      "its kink at 0")
    a("--scorer-residual", action="store_true", help="score with H = V + P·V (each filter's own "
      "projection beside the attended one; ours): scores that tell filters apart")
    a("--penalty-balance", default="filter", choices=["filter", "unit", "budget"],
      help="the penalty's balance across units (ours): filter = mean gate over all filters; "
           "unit = mean gate per unit, then over units; budget = |mean gate − --keep|")
    a("--bn-reestimate", type=int, default=40, help="re-estimate BN running statistics on "
      "this many training batches (no gradient) before the evaluation that follows a selection "
      "or compaction, and before the final evaluation (ours; 0: off); metrics.jsonl and "
      "report.json log the figure before and after")
    a("--after-select", default=None, choices=["compact", "masked"],
      help="compact: remove filters once at selection; masked: gradual, --steps events to "
      "E_final, then removed (default: masked for PAAM with a --keep budget over params+MACs "
      "or MACs, chosen on paired seeds, RESULTS.md \"Gradual cutting\"; compact otherwise)")
    a("--steps", type=int, default=4, help="selection events in masked mode")
    a("--val", type=_val, default=None, help="carve a validation set from the training set "
      "(a fraction, or a count): per-epoch accuracy is measured on it, never on the test set")
    a("--subset", type=int, default=None, help="train on this many images of the training split "
      "(after --val is carved out; stratified, fixed seed): quick searches on small machines "
      "(digits and cifar10)")
    a("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--cuda-graphs", action="store_true", help="capture the whole training step (forward, "
      "backward, SGD update) as one CUDA graph and replay it; re-captured after every "
      "selection event and compaction (needs a GPU; SGD)")
    a("--compile", action="store_true", help="torch.compile the model (re-compiled after a "
      "compaction)")
    a("--workers", type=int, default=8, help="DataLoader workers (imagenet / imagefolder)")
    a("--decode", choices=["auto", "device", "workers"], default="auto",
      help="imagenet / imagefolder: 'device' decodes each batch of JPEGs on the training device "
      "(torchvision.io.decode_jpeg, nvJPEG on a GPU) and augments there, the workers only read "
      "files; 'workers' decodes with Pillow in the workers; 'auto': device on a GPU")
    a("--image-size", type=int, default=224, help="crop size (imagenet / imagefolder)")
    a("--cache", default=None, help="where decoded arrays are cached (default $PAAM_FAST_CACHE "
      "or ~/.cache/paam_fast)")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--seed", type=int, default=0, help="seed of the weights, the data order and augmentation")
    a("--out", default=None, help="output folder (default runs/<dataset>-<arch>-<method>-<time>); "
      "an existing non-empty one is refused unless --resume")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
      "(its saved configuration is used)")
    a("--fork-from", default=None, metavar="RUN", help="start from RUN's pre-selection "
      "checkpoint (its presel.pt, written at the selection epoch) and apply this run's "
      "selection: rules compared on one identical joint phase (ours); every option that shaped "
      "the joint phase must equal RUN's")
    a("--stop-at-selection", action="store_true", help="the joint phase only: stop once the "
      "pre-selection checkpoint (presel.pt, what --fork-from starts from) is written, before "
      "any selection; no report.json. Train each seed's joint phase once, then fork every rule "
      "from it (--resume without this flag runs on to the end)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps in "
      "total (a smoke test, or a planned interruption: continue with --resume)")
    a("--quiet", action="store_true", help="no progress bars")
    return p


def _finite(v) -> bool:
    return math.isfinite(v)


# Every numeric option: (flag, attribute, test, what it must be).  Checked on the raw command
# line, before any recipe default fills in or any work starts, so a bad value is exit 2 naming
# the option (never a traceback, never a silent default).
_RANGES = [
    ("--epochs", "epochs", lambda v: v >= 1, "a positive integer"),
    ("--batch-size", "batch_size", lambda v: v >= 1, "a positive integer"),
    ("--lr", "lr", lambda v: _finite(v) and v > 0, "a positive number"),
    ("--weight-decay", "weight_decay", lambda v: _finite(v) and v >= 0, "a number ≥ 0"),
    ("--lam", "lam", lambda v: _finite(v) and v >= 0, "a number ≥ 0"),
    ("--dim", "dim", lambda v: v >= 1, "a positive integer"),
    ("--leak", "leak", lambda v: _finite(v) and v >= 0, "a number ≥ 0"),
    ("--keep", "keep", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    ("--min-keep", "min_keep", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("--round-to", "round_to", lambda v: v >= 1, "a positive integer"),
    ("--steps", "steps", lambda v: v >= 1, "a positive integer"),
    ("--select-epoch", "select_epoch", lambda v: v >= 1, "a positive integer"),
    ("--final-epoch", "final_epoch", lambda v: v >= 1, "a positive integer"),
    ("--select-beta", "select_beta", lambda v: 0 <= v <= 4, "a number in [0, 4]"),
    ("--subset", "subset", lambda v: v >= 1, "a positive integer"),
    ("--workers", "workers", lambda v: v >= 0, "an integer ≥ 0"),
    ("--image-size", "image_size", lambda v: v >= 1, "a positive integer"),
    ("--max-steps", "max_steps", lambda v: v >= 1, "a positive integer"),
    ("--bn-reestimate", "bn_reestimate", lambda v: v >= 0, "an integer ≥ 0"),
    ("--latency-batch", "latency_batch", lambda v: v >= 1, "a positive integer"),
    ("--latency-verify", "latency_verify", lambda v: v >= 0, "a non-negative integer"),
    ("--taylor-batches", "taylor_batches", lambda v: v >= 1, "a positive integer"),
    ("--score-warmup", "score_warmup", lambda v: _finite(v) and v >= 0, "a number ≥ 0"),
    ("--score-lr-scale", "score_lr_scale", lambda v: _finite(v) and v > 0, "a positive number"),
    ("--init-bias", "init_bias", _finite, "a finite number"),
    ("--warmup", "warmup", lambda v: _finite(v) and v >= 0, "a number of epochs ≥ 0"),
]


def _check_ranges(args: argparse.Namespace) -> None:
    for flag, attr, ok, what in _RANGES:
        v = getattr(args, attr, None)
        if v is not None and not ok(v):
            raise UsageError(f"{flag} must be {what}, got {v}")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Check the command line and fill recipe defaults; raises UsageError."""
    _check_ranges(args)
    r = RECIPES[args.dataset]
    args.arch = args.arch or r.arch
    if args.arch not in ARCHS and not args.arch.startswith("timm:"):  # timm:<name>: get_model
        raise UsageError(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    args.epochs = args.epochs if args.epochs is not None else r.epochs
    args.batch_size = args.batch_size if args.batch_size is not None else r.batch_size
    args.lr = args.lr if args.lr is not None else r.lr
    args.weight_decay = args.weight_decay if args.weight_decay is not None else r.weight_decay
    args.round_to = args.round_to if args.round_to is not None else r.round_to
    for flag, v in (("--select-epoch", args.select_epoch), ("--final-epoch", args.final_epoch)):
        if v is not None and v > args.epochs:
            raise UsageError(f"{flag} must be at most --epochs ({args.epochs}), got {v}")
    if args.select_epoch is not None and args.final_epoch is not None \
            and args.final_epoch < args.select_epoch:
        raise UsageError(f"--final-epoch ({args.final_epoch}) must not come before "
                         f"--select-epoch ({args.select_epoch})")
    if args.retrain is not None:
        if args.method not in ("paam", "retrain"):
            raise UsageError(f"--retrain trains found widths; it cannot go with --method "
                             f"{args.method}")
        args.method = "retrain"
        args.retrain_widths = _retrain_widths(args.retrain)
    elif args.method == "retrain":
        raise UsageError("--method retrain needs --retrain RUN (a PAAM run's folder or "
                         "report.json)")
    if args.init_bias is None:
        args.init_bias = default_init_bias(args.normalize)
    if args.penalty_balance == "budget" and args.method == "paam" and args.mass is not None:
        raise UsageError("--penalty-balance budget needs a budget: --keep or --target, not "
                         "--mass")
    if args.lam is None:
        args.lam = {"slim": DEFAULT_SLIM_LAMBDA, "torch-pruning": tp_peer.DEFAULT_REG}.get(
            args.method, DEFAULT_LAMBDA)
    if args.keep is None and args.mass is None and args.target is None:
        args.keep = 0.5
    if args.target is not None and args.keep is not None \
            and args.method not in ("uniform", "random"):
        args.keep = None  # --target implies mass-mode selection
    _selection_defaults(args)
    if args.method == "torch-pruning":
        _check_torch_pruning(args)
    _check_tp_scope(args)
    if args.select_key == "taylor":
        if args.method != "paam":
            raise UsageError(f"--select-key taylor measures PAAM's gates' effect on the loss; "
                             f"--method {args.method} has no such gates")
        if args.keep is None:
            raise UsageError("--select-key taylor needs a budget (--keep), not --mass/--target")
    if args.method in ("uniform", "random") and args.keep is None:
        raise UsageError(f"--method {args.method} needs --keep (the parameter budget)")
    if args.dataset != "digits" and not args.data:
        raise UsageError(f"--dataset {args.dataset} needs --data PATH\n{D.LAYOUTS}")
    if args.stop_at_selection:
        if args.method not in ("paam", "slim"):
            raise UsageError(f"--stop-at-selection stops before a selection; --method "
                             f"{args.method} has none")
        if args.fork_from is not None:
            raise UsageError("--stop-at-selection with --fork-from: a fork starts at the "
                             "selection, there is no joint phase to stop after")
    if args.fork_from is not None:
        if args.method not in ("paam", "slim"):
            raise UsageError(f"--fork-from forks a selection; --method {args.method} has none")
        fork.check_source(args, args.fork_from, vars(build_parser().parse_args([])))
    if args.latency_verify and not (args.select_cost == "latency" and args.keep is not None
                                    and args.method in ("paam", "slim")):
        raise UsageError("--latency-verify needs --select-cost latency and --keep (paam or slim)")
    if args.latency_table is not None:
        if "latency" not in (args.select_cost, args.cost):
            raise UsageError("--latency-table is used only with --select-cost latency or "
                             "--cost latency")
        from .latency import LatencyTable

        try:
            LatencyTable.load(args.latency_table)
        except ValueError as e:
            raise UsageError(f"--latency-table: {e}") from e
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        raise UsageError("--cuda-graphs needs a CUDA GPU (none is available or --device is cpu)")
    return args


# What selection did before its defaults were chosen on evidence (and what a resumed run whose
# configuration predates these options ran with): the paper-literal gate over parameters, cut
# once.
LEGACY_SELECTION = {"select_key": "gate", "select_cost": "params", "select_beta": 0.0,
                    "after_select": "compact"}


def _selection_defaults(args) -> None:
    """Fill --select-key / --select-cost / --select-beta / --after-select left unset.  With a
    --keep budget, PAAM selects by value per joint cost (the Taylor key divided by
    a·params/P + (1 − a)·MACs/M, both parts of a params+MACs budget binding) and cuts to it in
    masked steps, and uniform and random thinning take the same
    params+MACs budget so that the baselines land at the same point: on the CIFAR proxy this
    beat uniform thinning at equal parameters and MACs over 5 paired seeds (RESULTS.md, "Value
    per joint cost"), where the paper-literal gate over parameters tied it at equal parameters
    and spent 1.7× its MACs.  Under a MAC budget alone (--select-cost flops) PAAM selects by
    value per MAC, the Taylor key divided by each filter's MACs, also cut in masked steps.  Mass
    and target modes (they read the gates' mass), Network Slimming and Torch-Pruning (peers, as
    published) keep the gate over parameters.  An option given on the command line is never
    overridden."""
    budget = args.keep is not None and args.mass is None and args.target is None
    joint = budget and args.method in ("paam", "uniform", "random")
    if args.select_cost is None:
        args.select_cost = "params+flops" if joint else LEGACY_SELECTION["select_cost"]
    # the evidence is for the Taylor key at β = 1 under a params+MACs budget and under a MAC
    # budget alone (value per MAC beat the gate there over 5 paired seeds, RESULTS.md "value
    # per MAC"); under a parameter or a latency budget the old defaults stay (the Taylor key
    # per predicted ms lost to the gate at half latency, 2 seeds)
    chosen = budget and args.method == "paam" and args.select_cost in ("params+flops", "flops")
    if args.select_key is None:
        args.select_key = "taylor" if chosen else LEGACY_SELECTION["select_key"]
    if args.select_beta is None:
        args.select_beta = 1.0 if chosen else LEGACY_SELECTION["select_beta"]
    # cutting to the budget in masked steps (the network adapting between them) beat the
    # one-shot cut at 0.15 of params and MACs over 5 paired seeds (+1.63 ± 0.56, p = 0.003),
    # was not worse at 0.3 (RESULTS.md, "Gradual cutting"), and beat it under a MAC budget of
    # 0.3 (+0.62 ± 0.32, p = 0.013, "The gradual cut under a MAC budget"): the evidence is
    # for the same budgets as the Taylor key per cost's
    if args.after_select is None:
        args.after_select = "masked" if chosen else LEGACY_SELECTION["after_select"]


def _check_torch_pruning(args) -> None:
    """--method torch-pruning: the package is there, and no option asks for what it lacks."""
    try:
        tp_peer.require()
    except tp_peer.MissingTorchPruning as e:
        raise UsageError(str(e)) from None
    if args.mass is not None or args.target is not None:
        raise UsageError("--method torch-pruning prunes to a budget: --keep, not --mass or "
                         "--target")
    if args.select_cost not in ("params", "flops"):
        raise UsageError(f"--method torch-pruning searches its global ratio on params or flops, "
                         f"not --select-cost {args.select_cost}")
    if args.cuda_graphs:
        raise UsageError("--method torch-pruning cannot run with --cuda-graphs: its regularizer "
                         "reads the host after every backward")


def _check_tp_scope(args) -> None:
    if args.tp_scope != "all" and args.method != "torch-pruning":
        raise UsageError("--tp-scope is used only with --method torch-pruning")


def _retrain_widths(path: str) -> dict:
    """The selected widths of a finished run: {"widths": {unit: w}} (runs since --retrain) or
    {"per_layer": [...]} (older report.json: widths by producing conv), plus where they came
    from.  Raises UsageError when there is no such report."""
    rp = os.path.join(path, "report.json") if os.path.isdir(path) else path
    try:
        with open(rp) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--retrain {path}: cannot read a report.json ({e})") from e
    if rep.get("method") not in ("paam", "slim", "retrain"):
        raise UsageError(f"--retrain {path}: the run's method is {rep.get('method')!r}; widths "
                         "come from a paam (or slim) run")
    return {"source": os.path.abspath(rp), "arch": rep.get("arch"), "dataset": rep.get("dataset"),
            "widths": rep.get("widths"),
            "per_layer": {r["name"]: [r["filters_dense"], r["filters_final"]]
                          for r in rep.get("per_layer", [])}}
