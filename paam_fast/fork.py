"""Fork a run from another run's pre-selection checkpoint (``paam-train --fork-from RUN``).

A PAAM (or slim) run writes ``presel.pt`` at the end of its last joint epoch, just before the
selection: the network, the scoring networks, the optimizer, the schedule and λ.  A fork starts
from that state and applies its own selection rule (budget, cost, key, allocation, rounding), so
rules are compared on one identical pre-selection state and the joint phase is paid once per
seed.  Everything that shaped the joint phase must match the source run; only the options below
may differ.
"""

from __future__ import annotations

import json
import os

import torch

# Options a fork may set differently from its source: what happens at and after selection, and
# how the run is executed or logged.  Everything else shaped the joint phase and must match.
FORK_FREE = frozenset({
    "out", "resume", "max_steps", "stop_at_selection", "quiet", "fork_from", "data", "cache",
    "device", "workers",
    "keep", "mass", "select_cost", "select_key", "select_beta", "select_allocation", "min_keep",
    "round_to", "after_select", "steps", "final_epoch", "bn_reestimate", "channels_last",
    "compile", "cuda_graphs", "latency_table", "latency_batch", "latency_fit", "taylor_batches",
})
PRESEL = "presel.pt"


class ForkError(Exception):
    """The source run cannot be forked into this one (the CLI turns it into exit code 2)."""


def presel_path(run_dir: str) -> str:
    return os.path.join(run_dir, PRESEL)


def check_source(args, run_dir: str, defaults: dict | None = None) -> None:
    """Raise ForkError unless ``run_dir`` holds a pre-selection checkpoint of a run whose
    joint-phase options equal this run's.  ``defaults``: the options' default values; an option
    the source's configuration does not name (it was added after that run's version) counts as
    its default, which is how every option added since keeps the old behaviour."""
    path = presel_path(run_dir)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path) or not os.path.exists(cfg_path):
        raise ForkError(f"--fork-from {run_dir}: no {PRESEL} and config.json there (a paam or "
                        "slim run writes them at its selection epoch)")
    with open(cfg_path) as f:
        src = json.load(f)
    mine = vars(args)
    defaults = defaults or {}
    differ = sorted(k for k in set(src) | set(mine) if k not in FORK_FREE
                    and src.get(k, defaults.get(k)) != mine.get(k))
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} {src.get(k)!r} vs {mine.get(k)!r}"
                          for k in differ[:6])
        raise ForkError(f"--fork-from {run_dir}: the joint phase differs ({shown}); only "
                        "selection and execution options may differ from the source run")


def load(run_dir: str, device) -> dict:
    return torch.load(presel_path(run_dir), map_location=device, weights_only=True)
