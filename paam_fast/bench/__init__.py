"""``paam-bench``: the benchmark suite on the user's machine, side by side in one run.

On a GPU: scoring of ResNet50's gated layers (one chain per layer, batched reference, Triton;
eager and CUDA-graphed; ATen ops and kernel launches), the whole training step (dense,
PAAM-reference, PAAM-Triton; eager, graphed, compiled) for ResNet56 at batch 128 and ResNet50 at
batch 256, masked-mode compute, and latency budgets (a latency table's prediction against the
measured exported networks: dense, PAAM at a latency budget, uniform at the same measured
latency).  On the CPU: the same at small shapes, labelled as such.  One JSON per benchmark in
``--out``.
"""

from __future__ import annotations

import argparse
import os

import torch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="paam-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", nargs="+", default=["scoring", "step", "masked", "latency"],
                    choices=["scoring", "step", "masked", "latency"])
    ap.add_argument("--out", default="paam-bench-results", help="folder for the JSON files")
    a = ap.parse_args(argv)
    os.environ["PAAM_BENCH_OUT"] = a.out
    gpu = torch.cuda.is_available()
    print("paam-bench on", torch.cuda.get_device_name(0) if gpu else
          "the CPU (small shapes: figures are for comparison on this machine only)")
    from . import latency, masked, scoring, train_step

    if "scoring" in a.suite:
        scoring.main(["--arch", "resnet50", "--size", "224" if gpu else "64",
                      "--reps", "20" if gpu else "3"])
    if "step" in a.suite:
        train_step.main(["--arch", "resnet56", "--batch", "128" if gpu else "8", "--size", "32"])
        if gpu:
            train_step.main(["--arch", "resnet50", "--batch", "256", "--size", "224"])
    if "masked" in a.suite:
        masked.main(["--arch", "resnet50"] + (["--batch", "256", "--size", "224"] if gpu else
                                               ["--batch", "4", "--size", "64",
                                                "--fractions", "1.0", "0.5"]))
    if "latency" in a.suite:
        latency.main(["--arch", "resnet50", "--size", "224", "--batch", "1"] if gpu else
                     ["--arch", "resnet20", "--size", "32", "--num-classes", "10", "--batch",
                      "32", "--keeps", "0.7", "--grid", "6"])
    return 0
