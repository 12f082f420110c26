"""paam_fast: PAAM (Pruning by Active Attention Manipulation, arXiv 2210.11114) for PyTorch.

    import paam_fast as pf
    model = pf.paamify(model)                      # gates, scoring networks, in place
    loss = task_loss + lam * pf.penalty(model)
    plan = pf.select(model, keep=0.5)              # global selection, hard masks
    pf.compact(model, optimizer=opt)               # physical removal, optimizer sliced
    plain = pf.export(model)                       # plain torch modules

See ../shared/PAAM_METHOD.md for the method as implemented, and the README for which choices
are the paper's and which are ours.
"""

from . import models, nn
from .count import count
from .export import apply_plan, export, load, plan_of, save
from .paamify import (
                      PaamController,
                      apply_masks,
                      compact,
                      freeze,
                      is_paamified,
                      paamify,
                      param_groups,
                      penalty,
                      scores,
                      select,
)
from .pruner import Pruner
from .report import Report, report
from .selection import Selection
from .step import TrainStep

__version__ = "0.1.0"

__all__ = ["paamify", "scores", "penalty", "select", "apply_masks", "freeze", "compact",
           "export", "count", "save", "load", "plan_of", "apply_plan", "report", "Report",
           "Pruner", "Selection", "PaamController", "is_paamified", "param_groups", "models",
           "nn", "TrainStep", "__version__"]
