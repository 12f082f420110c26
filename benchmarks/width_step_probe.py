"""Probe (not a benchmark): does the time of CIFAR ResNet20 (grouped, batch 256, one thread)
step at widths that are multiples of 8, inside the network or for a layer alone?  One conv + BN
+ ReLU is timed at each stage's spatial size (32, 16, 8) at an aligned width and the next, both
sides, and the whole network at k/16 of every unit's width.

    OMP_NUM_THREADS=1 python benchmarks/width_step_probe.py

Prints one conv + BN + ReLU at w -> w channels, then the exported network with every unit at
k/16 of its width, each set timed interleaved (BENCHMARKS.md, "A curve through measured
networks")."""
import torch

import paam_fast as pf
from paam_fast.bench.harness import compare_ms
from paam_fast.export import export
from paam_fast.latency import _forward, _fraction_alive, _input, _prepare, _runner
from paam_fast.paamify import apply_masks, controller


def main() -> None:
    torch.set_num_threads(1)
    for hw, ws in ((32, (8, 9)), (16, (12, 13)), (16, (16, 17)), (16, (24, 25)), (8, (32, 33))):
        op = {"kind": "conv", "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
              "dilation": [1, 1], "groups": 1, "bias": False, "padding_mode": "zeros",
              "depthwise": False, "bn": True, "act": "relu", "inplace": True, "hw": [hw, hw]}
        layers = {f"conv {hw}x{hw} {i}->{o}": _runner(op, i, o, 256, "cpu", torch.float32, False)
                  for i in ws for o in ws}
        for k, v in compare_ms(layers, device="cpu", warmup=2, rounds=7).items():
            print(k, round(v["median_ms"], 2))
    model = pf.paamify(pf.models.get_model("resnet20", num_classes=10), coupling="grouped",
                       input_size=(1, 3, 32, 32))
    units = controller(model).structure.units
    x = _input(256, (1, 3, 32, 32), "cpu", torch.float32, False)
    nets = {}
    for k in (8, 9, 10, 11, 12, 16):
        apply_masks(model, _fraction_alive(units, k / 16))
        nets[f"net {k}/16"] = _forward(_prepare(export(model), "cpu", torch.float32, False), x)
    for k, v in compare_ms(nets, device="cpu", warmup=2, rounds=7).items():
        print(k, round(v["median_ms"], 1))


if __name__ == "__main__":
    main()
