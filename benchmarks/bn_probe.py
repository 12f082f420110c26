"""Re-estimate the BN statistics of finished ``paam-train`` runs and evaluate again.

For each run folder (embedded-default runs, 2 epochs): load its last checkpoint, print the test
top-1 with the stored running statistics, then after ``_reestimate_bn`` on 5, 22 and 110 training
batches (110 = five passes over the digits split).  RESULTS.md, "Short runs and BN statistics".

    python benchmarks/bn_probe.py runs/a runs/b
"""

import copy
import sys

import paam_fast.train as T


def probe(out: str) -> str:
    args = T.build_parser().parse_args(["--epochs", "2", "--out", out, "--quiet"])
    T.resolve(args)
    r = T.Run(args, T.Dist())
    assert r.load_checkpoint(), f"no checkpoint in {out}"
    state = copy.deepcopy(r.model.state_dict())
    res = [f"as stored {T._evaluate(r.model, r.data.test, r.dev, args, r.d):.4f}"]
    for n in (5, 22, 110):
        r.model.load_state_dict(state)
        batches = [b for _ in range(-(-n // len(r.data.train))) for b in r.data.train]
        k = T._reestimate_bn(r.model, batches, n, r.dev, args)
        res.append(f"{k} batches {T._evaluate(r.model, r.data.test, r.dev, args, r.d):.4f}")
    return f"{out}: " + ", ".join(res)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(probe(path))
