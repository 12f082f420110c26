"""Triton kernels of paam_fast, installed as ``paam_fast.kernels``.

Only ``@triton.jit`` kernels live here (no torch.library code): ``scoring.py`` holds the fused
scoring network (projections, attention, gate and gated BN affines, and their backward) for
every unit of a model at once.  The registered ops, host launchers and launch plans are in
``paam_fast.triton_scoring``; the choice between a kernel and its pure-PyTorch reference is made
in ``paam_fast.dispatch``.  Importing ``paam_fast`` never requires Triton; importing this
package's modules does.
"""
