"""The CIFAR-10 settings search of the "CIFAR-10 experiment" work item, as a resumable driver.

Each run is one ``paam-train`` invocation on a validation split carved from the training set
(never the test set); results are appended to ``--results`` (JSONL: setting, seed, validation
top-1, params, FLOPs, per-unit widths) and summarised by ``--summary``.  Runs already in the
results file are skipped, so the driver can be stopped and started again.

    python benchmarks/cifar_search.py --grid cpu-small --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/cifar_search.py --summary --results RESULTS/cifar_search.jsonl

``--at COMMIT`` runs one commit's code and grid, not the working tree's: the commit is exported
once (``git archive``) beside ``--runs`` as ``src-<commit>``, and that tree's driver runs from
there with ``--src``/``--commit`` (the rows then name the commit they were made with).
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

# CPU grid: ResNet20 on a 10k-image training subset, 15 epochs, selection at 30%, 50% params.
BASE_CPU = ["--arch", "resnet20", "--epochs", "15", "--val", "5000", "--subset", "10000",
            "--keep", "0.5", "--round-to", "1", "--quiet"]
# Issue 11's proxy, where allocation should matter more: all 45k remaining training images (or
# --subset), cosine, keep 0.3, selection at ~25%; epochs and subset set on the command line
# (--epochs, --subset) because the 2-core budget decides them.
BASE_PROXY = ["--arch", "resnet20", "--val", "5000", "--keep", "0.3", "--round-to", "1",
              "--schedule", "cosine", "--quiet"]
# Proxy v2 (issue 18): closer to convergence and less chaotic than the issue-11 proxy: a
# 20,000-image subset of the 45,000 training images, 15 epochs cosine after a 1-epoch linear
# warm-up (without it the first epoch's mean loss was above ln 10: lr 0.1 from step 0 blew the
# start up, the amplifier of the rounding noise), selection after epoch 4 (27%), channels_last.
# --epochs / --select-epoch / --subset come from the command line (defaults below).
BASE_PROXY2 = ["--arch", "resnet20", "--val", "5000", "--keep", "0.3", "--round-to", "1",
               "--schedule", "cosine", "--warmup", "1", "--channels-last", "--quiet"]
# Every grid's settings were named when paam-train's selection defaulted to the gate over
# parameters, cut once; the grids say so explicitly, so that a setting keeps its meaning at any
# commit (the defaults became value per joint cost, then the masked cut, later:
# train_options.py, _selection_defaults).  A setting's own options come after these and
# replace them.
_PAPER_SELECTION = ["--select-key", "gate", "--select-cost", "params", "--select-beta", "0",
                    "--after-select", "compact"]
BASES = {"cpu-small": BASE_CPU + _PAPER_SELECTION, "proxy": BASE_PROXY + _PAPER_SELECTION,
         "proxy2": BASE_PROXY2 + _PAPER_SELECTION}
# forks: the same seed's PAAM run's pre-selection state, another selection rule
_FORK = ["--fork-from", "{runs}/paam-s{seed}"]
# measured by: OMP_NUM_THREADS=1 python -m paam_fast.bench.latency --arch resnet20 --size 32
#   --batch 256 --num-classes 10 --round-to 1 --channels-last --keeps 0.5 --save-table <it>
# (relative to the source tree the runs start in)
_LATENCY_TABLE = "results/latency/resnet20-b256-cl-1thread.json"
GRIDS = {
    "proxy2": [
        ("dense", ["--method", "dense"]),
        ("uniform", ["--method", "uniform"]),
        ("paam", []),  # the library defaults of 438915d (b0 = -2, λ 0.05, key = gate, params)
        ("paam key=unit_mean", [*_FORK, "--select-key", "unit_mean"]),
        # the filter's first-order effect on the loss, in loss units (comparable across units)
        ("paam key=taylor", [*_FORK, "--select-key", "taylor"]),
        ("paam same-pipeline uniform", [*_FORK, "--select-allocation", "uniform"]),
        # is it the allocation or the joint phase? The Taylor key inside every unit, uniform
        # thinning's widths (exactly its params and MACs): the Taylor joint-β rows' fork,
        # without their allocation (their widths retrained from scratch tie uniform thinning)
        ("paam key=taylor same-pipeline uniform", [*_FORK, "--select-key", "taylor",
                                                   "--select-allocation", "uniform"]),
        ("paam beta=1", [*_FORK, "--select-beta", "1"]),
        ("paam key=unit_mean beta=1", [*_FORK, "--select-key", "unit_mean", "--select-beta",
                                       "1"]),
        # equal MACs: the budget in MACs, for PAAM and for uniform thinning
        ("uniform flops=0.3", ["--method", "uniform", "--select-cost", "flops"]),
        ("paam flops=0.3", [*_FORK, "--select-cost", "flops"]),
        # at most uniform's MACs *and* (if the key spreads the cut) at most its parameters: the
        # network must then beat uniform thinning at keep 0.3 on both axes at once
        ("paam key=taylor flops=0.3", [*_FORK, "--select-key", "taylor", "--select-cost",
                                       "flops"]),
        ("paam key=unit_mean flops=0.3", [*_FORK, "--select-key", "unit_mean", "--select-cost",
                                          "flops"]),
        # value per MAC (the knapsack greedy of a MAC budget): the late, MAC-cheap filters first
        ("paam key=taylor flops=0.3 beta=1", [*_FORK, "--select-key", "taylor", "--select-cost",
                                              "flops", "--select-beta", "1"]),
        # both budgets at once: at most uniform thinning's params and its MACs at keep 0.3
        ("paam key=taylor both=0.3", [*_FORK, "--select-key", "taylor", "--select-cost",
                                      "params+flops"]),
        ("paam key=unit_mean both=0.3", [*_FORK, "--select-key", "unit_mean", "--select-cost",
                                         "params+flops"]),
        # ranked in that order the MAC part binds first and parameters stay unspent (Taylor:
        # 12.5% params at 29.4% MACs); value per cost, the two parts weighed so that both bind
        # (selection/balance.py), lands at ~0.3 of each: uniform thinning's point
        ("paam key=taylor both=0.3 beta=1", [*_FORK, "--select-key", "taylor", "--select-cost",
                                             "params+flops", "--select-beta", "1"]),
        ("paam key=unit_mean both=0.3 beta=1", [*_FORK, "--select-key", "unit_mean",
                                                "--select-cost", "params+flops",
                                                "--select-beta", "1"]),
        # is it the widths or the PAAM run? The widths it chose, trained from scratch as
        # uniform thinning is (same recipe, no joint phase, no scoring)
        ("retrain key=taylor both=0.3 beta=1",
         ["--method", "retrain", "--retrain", "{runs}/paam_keytaylor_both0.3_beta1-s{seed}"]),
        # issue 20: half the latency of dense ResNet20 at batch 256 (channels_last, 1 thread,
        # this CPU), by one table measured once on an idle machine and committed, so PAAM and
        # uniform aim at the same predicted budget; their exported networks are timed after
        ("uniform latency=0.5", ["--method", "uniform", "--select-cost", "latency", "--keep",
                                 "0.5", "--latency-table", _LATENCY_TABLE]),
        ("paam latency=0.5", [*_FORK, "--select-cost", "latency", "--keep", "0.5",
                              "--latency-table", _LATENCY_TABLE]),
        ("paam key=taylor latency=0.5", [*_FORK, "--select-key", "taylor", "--select-cost",
                                         "latency", "--keep", "0.5", "--latency-table",
                                         _LATENCY_TABLE]),
        # value per predicted ms (the knapsack greedy of a latency budget): at β = 0 the Taylor
        # key fills the budget with the costly early filters (seed 1: 61.62% vs uniform 66.74%)
        ("paam key=taylor latency=0.5 beta=1", [*_FORK, "--select-key", "taylor",
                                                "--select-cost", "latency", "--select-beta", "1",
                                                "--keep", "0.5", "--latency-table",
                                                _LATENCY_TABLE]),
        # a severer budget: does the allocation matter more when every unit is cut harder?
        # The default at 0.15 of params and MACs, and the same fork at uniform thinning's
        # widths (the allocation's share, paired on one joint phase)
        ("paam key=taylor both=0.15 beta=1", [*_FORK, "--select-key", "taylor", "--select-cost",
                                              "params+flops", "--select-beta", "1", "--keep",
                                              "0.15"]),
        ("paam key=taylor same-pipeline uniform keep=0.15", [*_FORK, "--select-key", "taylor",
                                                              "--select-allocation", "uniform",
                                                              "--keep", "0.15"]),
        # at 0.15 the same joint phase cut once to uniform widths lands below uniform thinning
        # from scratch (its warm start no longer pays): the default's rule reaching 0.15 in 4
        # equal masked steps between the selection epoch and half the run (--after-select
        # masked, PAAM_METHOD.md), the network adapting between cuts
        ("paam key=taylor both=0.15 beta=1 masked", [*_FORK, "--select-key", "taylor",
                                                     "--select-cost", "params+flops",
                                                     "--select-beta", "1", "--keep", "0.15",
                                                     "--after-select", "masked"]),
        # the gradual cut's control: the same joint phase cut in the same masked steps to
        # uniform thinning's widths (each unit's own Taylor order): is the win at 0.15 the
        # allocation or the gradual cut?
        ("paam key=taylor same-pipeline uniform keep=0.15 masked",
         [*_FORK, "--select-key", "taylor", "--select-allocation", "uniform", "--keep", "0.15",
          "--after-select", "masked"]),
        # the same gradual cut at the default's own budget (paired with the one-shot default
        # `paam key=taylor both=0.3 beta=1`)
        ("paam key=taylor both=0.3 beta=1 masked", [*_FORK, "--select-key", "taylor",
                                                    "--select-cost", "params+flops",
                                                    "--select-beta", "1", "--keep", "0.3",
                                                    "--after-select", "masked"]),
        # ... and under a MAC budget (issue 18's second figure: uniform thinning at equal
        # MACs, `uniform flops=0.3`), paired with the one-shot `paam key=taylor flops=0.3 beta=1`
        ("paam key=taylor flops=0.3 beta=1 masked", [*_FORK, "--select-key", "taylor",
                                                     "--select-cost", "flops", "--select-beta",
                                                     "1", "--after-select", "masked"]),
        # the residual stages as units too (coupling="grouped" slices the option-A shortcut
        # since fcf82fb): its own joint phase (the units differ), so a whole run, cutting in
        # masked steps as the winner at 0.15 does; Torch-Pruning's edge at 0.15 came with
        # cutting the stages. And the one-shot cut, forked from its joint phase.
        ("paam grouped both=0.15 beta=1 masked", ["--coupling", "grouped", "--select-key",
                                                  "taylor", "--select-cost", "params+flops",
                                                  "--select-beta", "1", "--keep", "0.15",
                                                  "--after-select", "masked"]),
        ("paam grouped both=0.15 beta=1",
         ["--fork-from", "{runs}/paam_grouped_both0.15_beta1_masked-s{seed}", "--coupling",
          "grouped", "--select-key", "taylor", "--select-cost", "params+flops",
          "--select-beta", "1", "--keep", "0.15"]),
        # the stages cut the way Torch-Pruning cuts them (7 / 12 / 22 of 16 / 32 / 64 at 0.15),
        # without a global allocation (which starved them above, and which adds nothing inside
        # the internal units): every unit, stages included, at the same fraction, from the
        # grouped joint phase in the default's masked steps, and from scratch
        ("paam grouped joint", ["--coupling", "grouped", "--stop-at-selection"]),
        ("paam grouped same-pipeline uniform keep=0.15 masked",
         ["--fork-from", "{runs}/paam_grouped_joint-s{seed}", "--coupling", "grouped",
          "--select-key", "taylor", "--select-allocation", "uniform", "--keep", "0.15",
          "--after-select", "masked"]),
        ("uniform grouped keep=0.15", ["--method", "uniform", "--coupling", "grouped", "--keep",
                                       "0.15"]),
        # ... and at the default's budget: is the default's edge over uniform thinning at 0.3
        # an edge over thinning that leaves the stages whole (params go to the internal units)?
        ("uniform grouped keep=0.3", ["--method", "uniform", "--coupling", "grouped", "--keep",
                                      "0.3"]),
        # the widths the default chose at 0.15, trained from scratch like uniform thinning: at
        # 0.3 they tied it (the gain was the warm start); at 0.15, is it the widths?
        ("retrain key=taylor both=0.15 beta=1",
         ["--method", "retrain", "--retrain", "{runs}/paam_keytaylor_both0.15_beta1-s{seed}"]),
        # the peer and the plain warm start at 0.15: Torch-Pruning (params budget, stages cut
        # too), and 4 epochs of dense training then uniform widths by |γ| (at 0.3 that warm
        # start alone matched the default)
        ("torch-pruning keep=0.15", ["--method", "torch-pruning", "--keep", "0.15"]),
        # Torch-Pruning limited to PAAM's units at 0.15: is its edge there the stage channels
        # it cuts (PAAM cannot gate them on these ResNets: the option-A shortcut fixes them)?
        ("torch-pruning internal keep=0.15", ["--method", "torch-pruning", "--tp-scope",
                                              "internal", "--keep", "0.15"]),
        ("slim lam=0 same-pipeline uniform keep=0.15", ["--method", "slim", "--lam", "0",
                                                        "--select-allocation", "uniform",
                                                        "--keep", "0.15"]),
        # ... and that plain dense warm start cut in the same masked steps: does the gradual
        # cut need PAAM's joint phase at all?
        ("slim lam=0 same-pipeline uniform keep=0.15 masked",
         ["--method", "slim", "--lam", "0", "--select-allocation", "uniform", "--keep", "0.15",
          "--after-select", "masked"]),
        # the uniform curve: its accuracy against params and MACs at more budgets
        ("uniform keep=0.15", ["--method", "uniform", "--keep", "0.15"]),
        ("uniform keep=0.5", ["--method", "uniform", "--keep", "0.5"]),
        ("uniform keep=0.7", ["--method", "uniform", "--keep", "0.7"]),
        ("slim", ["--method", "slim"]),
        # issue 18's peers at the default's budget: Network Slimming (|γ| after its L1 joint
        # phase) ranked per joint cost like the Taylor key, and Torch-Pruning (group-norm sparse
        # learning, global L2 ranking; it budgets params or MACs only, and prunes the stage
        # channels too, so it is read on the uniform curve at both)
        ("slim both=0.3 beta=1", ["--method", "slim", "--select-cost", "params+flops",
                                  "--select-beta", "1"]),
        ("torch-pruning", ["--method", "torch-pruning"]),
        # Torch-Pruning limited to PAAM's units (each block's first conv; the residual stages
        # whole, as under PAAM's default): it ties the default while cutting the stages to
        # ~half (16/32/64 -> 7/19/33) -- is its edge the ranking or the stages it may cut?
        ("torch-pruning internal", ["--method", "torch-pruning", "--tp-scope", "internal"]),
        # the pipeline without PAAM's scoring: slim's joint phase (dense training with L1 on
        # BN γ), uniform thinning's widths chosen by |γ| inside each unit -- against
        # `paam key=taylor same-pipeline uniform`, is PAAM's joint phase or its key worth anything?
        ("slim same-pipeline uniform", ["--fork-from", "{runs}/slim_both0.3_beta1-s{seed}",
                                        "--method", "slim", "--select-allocation", "uniform"]),
        # the pipeline with nothing but dense training before the cut: no regularizer in the
        # 4 epochs (slim at λ = 0), uniform thinning's widths, |γ| choosing inside each unit --
        # do the warm starts above need their sparsity term at all?
        ("slim lam=0 same-pipeline uniform", ["--method", "slim", "--lam", "0",
                                              "--select-allocation", "uniform"]),
        # controls and the per-filter path of the scoring network
        ("random", ["--method", "random"]),
        # random widths (each seed its own draw) at uniform thinning's params *and* MACs, trained
        # like it: is any reallocation at this cost as good as the Taylor joint-β one?  (the
        # MAC part binds first for most draws: fewer params than 0.3, read on the curve)
        ("random both=0.3", ["--method", "random", "--select-cost", "params+flops"]),
        ("paam residual", ["--scorer-residual"]),
    ],
    "proxy": [
        ("dense", ["--method", "dense"]),
        ("uniform", ["--method", "uniform"]),
        ("paam b0=0", ["--lam", "0.05", "--init-bias", "0"]),
        ("paam b0=-2", ["--lam", "0.05", "--init-bias", "-2"]),
        ("paam b0=-2 balance=unit", ["--lam", "0.05", "--init-bias", "-2",
                                     "--penalty-balance", "unit"]),
        ("slim lam=1e-4", ["--method", "slim", "--lam", "1e-4"]),
        # is it the allocation or the training? PAAM's widths (same seed) trained from scratch
        ("retrain paam b0=-2", ["--retrain", "{runs}/paam_b0-2-s{seed}"]),
        ("retrain paam b0=0", ["--retrain", "{runs}/paam_b00-s{seed}"]),
    ],
    "cpu-small": [
        ("dense", ["--method", "dense"]),
        ("uniform", ["--method", "uniform"]),
        ("slim lam=1e-4", ["--method", "slim", "--lam", "1e-4"]),
        ("paam lam=0.05", ["--lam", "0.05"]),
        ("paam lam=0.5", ["--lam", "0.5"]),
        ("paam lam=2", ["--lam", "2"]),
        # after λ = 0.5 and 2 came out far below λ = 0.05, the variants run at small λ:
        ("paam lam=0.01", ["--lam", "0.01"]),
        ("paam lam=0 (scores, no penalty)", ["--lam", "0"]),
        ("paam lam=0.05 normalize=none", ["--lam", "0.05", "--normalize", "none"]),
        ("paam lam=0.05 min_keep=0.25", ["--lam", "0.05", "--min-keep", "0.25"]),
        ("paam lam=0.05 masked", ["--lam", "0.05", "--after-select", "masked"]),
        ("paam lam=0.05 select@60%", ["--lam", "0.05", "--select-epoch", "9"]),
        ("paam lam=0.05 cost=params", ["--lam", "0.05", "--cost", "params"]),
        # selecting later (60%) was worse than at 30%: does earlier selection, with more epochs
        # to recover at the final width, help?
        ("paam lam=0.05 select@15%", ["--lam", "0.05", "--select-epoch", "2"]),
        ("paam lam=0.05 select@20%", ["--lam", "0.05", "--select-epoch", "3"]),
        # the rest of the list not yet covered: λ controlled to a target, the FLOPs
        # cost in the penalty, the scoring network's width
        ("paam target=0.5", ["--lam", "0.05", "--target", "0.5"]),
        ("paam lam=0.05 cost=flops", ["--lam", "0.05", "--cost", "flops"]),
        ("paam lam=0.05 dim=8", ["--lam", "0.05", "--dim", "8"]),
        ("paam lam=0.05 dim=64", ["--lam", "0.05", "--dim", "64"]),
        # PAAM's validation accuracy collapsed for an epoch before selection in 2 of 3 seeds
        # (training accuracy did not): do the gates move too fast at the network's lr?
        ("paam lam=0.05 score-lr x0.1", ["--lam", "0.05", "--score-lr-scale", "0.1"]),
    ],
}


# The numerics every run is pinned to, whatever the machine: one thread, and AVX2 kernels in ATen,
# oneDNN and MKL (every x86-64 CPU of this project has AVX2).  A run is a chaotic function of its
# float rounding: at the issue-11 proxy, uniform seed 0 gave 52.98% val after 7 epochs with
# ATen's AVX2 kernels and 46.86% with its scalar ones, same machine, same command (RESULTS.md),
# and the recorded rows came from an AVX-512 Intel Xeon, the reruns from an AVX2 AMD EPYC.
PINNED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2",
              "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def _command(args, name: str, extra: list[str], seed: int, out: str) -> list[str]:
    extra = [x.format(seed=seed, runs=args.runs) for x in extra]
    base = list(BASES[args.grid])
    if args.grid in ("proxy", "proxy2"):
        base += ["--epochs", str(args.epochs), "--select-epoch", str(args.select_epoch)]
        base += ["--subset", str(args.subset)] if args.subset else []
    if "--target" in extra or "--keep" in extra:  # the setting's budget replaces the base's
        i = base.index("--keep")
        base = base[:i] + base[i + 2:]
    return ["-m", "paam_fast.train", "--dataset", "cifar10", "--data", args.data,
            "--seed", str(seed), "--out", out, *base, *extra]


def _launch(cmd: list[str], out: str, args) -> tuple[list[str], str | None]:
    """The command to run for ``out`` and what the row must say about it.  Never resumes
    silently: a finished run (report.json; presel.pt for a joint phase, --stop-at-selection)
    is not rerun (returns None), a half-finished one is resumed only if its saved
    configuration is the one this command would write, and the row then says "resumed"; any
    other folder content is an error."""
    if os.path.exists(os.path.join(out, "report.json")) or (
            "--stop-at-selection" in cmd and os.path.exists(os.path.join(out, "presel.pt"))):
        return None, "finished"
    if not os.path.isdir(out) or not os.listdir(out):
        return cmd, None
    if not (os.path.exists(os.path.join(out, "ckpt.pt")) and args.resume_partial):
        raise SystemExit(f"{out} holds an unfinished run: rerun with --resume-partial to "
                         "continue it with its own saved command, or remove it")
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    from paam_fast.train_options import build_parser, resolve

    now = vars(resolve(build_parser().parse_args(cmd[2:])))
    differ = [k for k in now if k in saved and saved[k] != now[k] and k not in
              ("out", "resume", "quiet", "device")]
    if differ:
        raise SystemExit(f"{out}: its saved configuration differs from this command in "
                         f"{differ}; not resumed")
    return cmd + ["--resume"], "resumed"


def run_grid(args) -> None:
    done = set()
    if os.path.exists(args.results):
        for line in open(args.results):
            r = json.loads(line)
            done.add((r["setting"], r["seed"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    env = {**os.environ, **PINNED_ENV}
    if args.src:  # an exported tree of one commit, not the shared working tree
        env["PYTHONPATH"] = os.path.abspath(args.src)
    for seed in args.seeds:
        for name, extra in GRIDS[args.grid]:
            if (name, seed) in done or (args.only and name not in args.only):
                continue
            out = os.path.join(args.runs, f"{name.replace(' ', '_').replace('=', '')}-s{seed}")
            cmd, how = _launch(_command(args, name, extra, seed, out), out, args)
            if cmd is None:
                print(f"{name} seed {seed}: {out} is finished but not in {args.results}; "
                      "not rerun, not recorded", flush=True)
                continue
            joint_only = "--stop-at-selection" in cmd
            t = time.time()
            res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"FAILED {name} seed {seed}: {res.stderr[-2000:]}", flush=True)
                continue
            if joint_only:  # a joint phase for forks: no report, no row (its command is the
                # grid's at this commit, and config.json in the folder)
                print(f"{name} seed {seed}: joint phase written to {out} "
                      f"({time.time() - t:.0f} s)", flush=True)
                continue
            row = _row(name, seed, out, cmd, time.time() - t, how, args)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} seed {seed}: val {row['val_top1']:.2%}, params {row['params']:,}, "
                  f"MACs {row['flops']:,}", flush=True)


def _row(name, seed, out, cmd, wall_s, how, args) -> dict:
    rep = json.load(open(os.path.join(out, "report.json")))
    pins = " ".join(f"{k}={v}" for k, v in PINNED_ENV.items())
    return {"setting": name, "seed": seed, "val_top1": rep["val_top1"],
            "params": rep["params_final"], "params_dense": rep["params_dense"],
            "flops": rep["flops_final"], "flops_dense": rep["flops_dense"],
            "widths": {r["name"]: r["filters_final"] for r in rep["per_layer"]},
            "per_unit": rep.get("widths"), "eval_before_bn": _before_bn(out),
            "wall_s": wall_s, "commit": args.commit or rep["commit"],
            "command": f"{pins} python " + " ".join(cmd), "resumed": how == "resumed",
            "fork_from": rep["config"].get("fork_from"),
            "environment": rep.get("environment"), "data_sha256": rep.get("data_sha256"),
            "split_digest": rep.get("split_digest"), "date": time.strftime("%Y-%m-%d")}


def _before_bn(out: str) -> list:
    """(epoch, val before, val after BN re-estimation) of the selection epochs."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    recs = [json.loads(x) for x in open(path)]
    return [[r["epoch"], r["eval_acc_before_bn"], r["eval_acc"]] for r in recs
            if "eval_acc_before_bn" in r]


def summary(paths: list[str]) -> str:
    rows, seen = [], set()
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if (r["setting"], r["seed"]) not in seen:  # a resumed finished run re-reports
                seen.add((r["setting"], r["seed"]))
                rows.append(r)
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    def mean_sd(xs):
        m = sum(xs) / len(xs)
        sd = (sum((a - m) ** 2 for a in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
        return m, sd

    # paired by seed against uniform thinning: same seed, same data order and augmentation
    base = {r["seed"]: r["val_top1"] for r in by.get("uniform", [])}
    lines = ["| setting | seeds | val top-1 (mean ± std) | − uniform, paired by seed (mean ± std, "
             "n) | params | MACs |", "|---|---|---|---|---|---|"]
    for name, rs in by.items():
        m, sd = mean_sd([r["val_top1"] for r in rs])
        diffs = [r["val_top1"] - base[r["seed"]] for r in rs if r["seed"] in base]
        paired = "" if name == "uniform" or not diffs else (
            "{:+.2f} ± {:.2f} pts, {}".format(*(100 * v for v in mean_sd(diffs)), len(diffs)))
        p = sum(r["params"] for r in rs) / len(rs)
        f = sum(r["flops"] for r in rs) / len(rs)
        lines.append(f"| {name} | {len(rs)} | {m:.2%} ± {sd:.2%} | {paired} | {p:,.0f} | "
                     f"{f:,.0f} |")
    lines += ["", "Every run (widths: kept filters of the gated units, in graph order):", "",
              "| setting | seed | val top-1 | params | MACs | widths of gated units | wall |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        gated = (list(r["per_unit"].values()) if r.get("per_unit") else
                 [w for n, w in r["widths"].items() if n.endswith("conv1") and "layer" in n])
        lines.append(f"| {r['setting']} | {r['seed']} | {r['val_top1']:.2%} | {r['params']:,} | "
                     f"{r['flops']:,} | {' '.join(map(str, gated))} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def export_commit(commit: str, root: str) -> tuple[str, str]:
    """``git archive`` of ``commit`` (of the repository holding the working directory) in
    ``root/src-<short sha>``, made once: two drivers may ask for it at the same time, so it is
    made under a lock and renamed into place whole.  Returns (the tree, the short sha)."""
    sha = subprocess.run(["git", "rev-parse", "--short=7", f"{commit}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--at {commit}: not a commit of this repository "
                         f"({sha.stderr.strip()})")
    sha = sha.stdout.strip()
    dest = os.path.join(root, f"src-{sha}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".export.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(dest):
            tmp = dest + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            archive = subprocess.run(["git", "archive", sha], capture_output=True, check=True)
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(tmp, filter="data")
            os.rename(tmp, dest)
    return dest, sha


def run_at_commit(argv: list[str], a: argparse.Namespace) -> None:
    """Re-run this command with the driver of ``a.at``'s exported tree, from inside it (its
    relative paths, e.g. a grid's latency table, are the commit's), paths made absolute."""
    dest, sha = export_commit(a.at, os.path.dirname(os.path.abspath(a.runs)))
    paths = {"--data": a.data, "--results": a.results, "--runs": a.runs}
    out, skip = [], False
    for x in argv:  # drop --at and the paths (given again below, absolute)
        if skip:
            skip = False
            continue
        key = x.split("=", 1)[0]
        if key == "--at" or key in paths:
            skip = "=" not in x  # "--runs DIR": DIR goes too
            continue
        out.append(x)
    for key, value in paths.items():
        out += [key, os.path.abspath(value)]
    out += ["--src", dest, "--commit", sha]
    os.chdir(dest)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, os.path.join("benchmarks", "cifar_search.py"),
                              *out])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="cpu-small", choices=sorted(GRIDS))
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--results", default="results/cifar_search.jsonl")
    ap.add_argument("--runs", default="runs/search")
    ap.add_argument("--only", nargs="+", default=None, help="run only these settings")
    ap.add_argument("--epochs", type=int, default=None,
                    help="proxy grids: epochs (proxy 8, proxy2 15)")
    ap.add_argument("--select-epoch", type=int, default=None,
                    help="proxy grids: selection epoch (proxy 2, proxy2 4)")
    ap.add_argument("--subset", type=int, default=None,
                    help="proxy grids: training images (proxy2 20000)")
    ap.add_argument("--src", default=None, help="run the code of this exported source tree "
                    "(PYTHONPATH), e.g. `git archive HEAD | tar -x -C DIR`")
    ap.add_argument("--commit", default=None, help="the commit --src was exported from")
    ap.add_argument("--at", default=None, metavar="COMMIT", help="run this commit's driver and "
                    "code (exported beside --runs), not the working tree's")
    ap.add_argument("--resume-partial", action="store_true", help="continue half-finished runs "
                    "(only with their own saved configuration; the row says so)")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--more-results", nargs="*", default=[],
                    help="with --summary: further results files (runs of parallel drivers)")
    a = ap.parse_args()
    if a.at:
        if a.src or a.commit or a.summary:
            ap.error("--at runs a commit's grid: no --src / --commit / --summary with it")
        run_at_commit(sys.argv[1:], a)
    v2 = a.grid == "proxy2"
    a.epochs = a.epochs or (15 if v2 else 8)
    a.select_epoch = a.select_epoch or (4 if v2 else 2)
    a.subset = a.subset or (20000 if v2 else None)
    if a.summary:
        print(summary([a.results, *a.more_results]))
    else:
        run_grid(a)
