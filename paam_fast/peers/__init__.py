"""Other pruning libraries run inside ``paam-train`` with the same data, recipe and seeds, so that
PAAM is compared with what a user would pick instead.  Each peer is optional: importing
paam_fast never needs it, and asking for a missing one is a clear error naming what to install.

* :mod:`.torch_pruning`: Torch-Pruning's group-norm sparse learning and one global pruning step
  (``paam-train --method torch-pruning``; ``pip install torch-pruning==1.6.1``).
"""
