"""Triton kernels of paam_fast, installed as ``paam_fast.kernels``.

Only ``@triton.jit`` kernels and their host launchers live here (no torch.library code): the
registered ops and the choice between a kernel and its pure-PyTorch reference are made in
``paam_fast.dispatch``.  Importing this package never requires Triton.

This build ships no kernel yet: scoring runs on the batched reference in
``paam_fast.scoring`` (see ``python -m paam_fast.info``).
"""
