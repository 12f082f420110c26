"""Global selection of the filters that survive (PAAM_METHOD.md §6.2), in replaceable parts.

* :mod:`.keys`: what each filter is ranked by (the gate by default; options comparable across
  units, and a key divided by the filter's cost^β).
* :mod:`.costs`: what a set of widths costs (parameters or MACs, counted exactly).
* :mod:`.groups`: grouped units (grouped convs) selected in steps of one filter per group.
* :mod:`.budget`: the searches: budget mode (greedy with an exact recount) and mass mode.
* :mod:`.choose`: the driver that puts them together; :mod:`.uniform`: the uniform baseline.
"""

from .choose import choose
from .costs import COSTS, cost_model
from .keys import KEYS
from .result import Selection, check_keep, check_mass
from .uniform import first_alive, random_alive, uniform_alive

__all__ = ["COSTS", "KEYS", "Selection", "check_keep", "check_mass", "choose", "cost_model",
           "first_alive", "random_alive", "uniform_alive"]
