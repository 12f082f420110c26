"""pytest-benchmark cases: scoring forward+backward of ResNet50's gated layers."""

import torch

from paam_fast.bench.harness import backend, count_ops
from paam_fast.bench.scoring import setup

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = 224 if DEV == "cuda" else 64


def _sync(fn):
    def call():
        fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
    return call


def test_scoring_batched_reference(benchmark):
    _, batched, _ = setup("resnet50", SIZE, DEV)
    with backend("reference"):
        benchmark.pedantic(_sync(batched), rounds=5, warmup_rounds=1)
        benchmark.extra_info.update(count_ops(batched))


def test_scoring_per_unit_chains(benchmark):
    _, _, chains = setup("resnet50", SIZE, DEV)
    benchmark.pedantic(_sync(chains), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(count_ops(chains))
