"""benchmarks/cifar_search.py: every grid setting is a command paam-train accepts.

A setting with a mistyped flag or a forbidden combination fails only when its run starts, often
in a background lane an hour later; here each is parsed and resolved as paam-train would.  The
settings that read an upstream run (a fork's pre-selection state, a retrain's widths) may fail
for that one reason only: the upstream run folder does not exist here."""

import importlib.util
import json
import os
import types

import pytest

from paam_fast.fork import ForkError
from paam_fast.train_options import UsageError, build_parser, resolve

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cifar_search.py")
_spec = importlib.util.spec_from_file_location("cifar_search", _path)
cs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cs)

SETTINGS = [(grid, name, extra) for grid, entries in cs.GRIDS.items() for name, extra in entries]


@pytest.mark.parametrize("grid,name,extra", SETTINGS, ids=[f"{g}:{n}" for g, n, _ in SETTINGS])
def test_setting_parses_and_resolves(tmp_path, grid, name, extra):
    runs = str(tmp_path / "runs")
    args = types.SimpleNamespace(grid=grid, runs=runs, epochs=15, select_epoch=4, subset=20000,
                                 data=str(tmp_path / "cifar10.tar.gz"))
    cmd = cs._command(args, name, extra, 0, str(tmp_path / "out"))
    assert cmd[:2] == ["-m", "paam_fast.train"]
    parsed = build_parser().parse_args(cmd[2:])  # argparse exits on an unknown flag
    try:
        resolve(parsed)
    except (ForkError, UsageError) as e:
        upstream = "--fork-from" in extra or "--retrain" in extra
        assert upstream and runs in str(e), f"{name}: {e}"


def test_run_folder_names_are_unique():
    for grid, entries in cs.GRIDS.items():
        names = [n.replace(" ", "_").replace("=", "") for n, _ in entries]
        assert len(names) == len(set(names)), grid


def test_a_joint_phase_setting_is_finished_once_its_presel_is_written(tmp_path):
    """A setting with --stop-at-selection leaves no report.json: its presel.pt is its end, and
    the driver must neither rerun it nor call its folder an unfinished run."""
    out = tmp_path / "paam_joint-s0"
    cmd = ["-m", "paam_fast.train", "--stop-at-selection", "--out", str(out)]
    args = types.SimpleNamespace(resume_partial=False)
    assert cs._launch(cmd, str(out), args) == (cmd, None)  # nothing there yet: run it
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="unfinished"):  # stopped before its selection
        cs._launch(cmd, str(out), args)
    (out / "presel.pt").write_bytes(b"")
    assert cs._launch(cmd, str(out), args) == (None, "finished")
    # a whole run's folder with a presel.pt but no report is still unfinished
    with pytest.raises(SystemExit, match="unfinished"):
        cs._launch(["-m", "paam_fast.train", "--out", str(out)], str(out), args)


def test_at_runs_the_commits_own_driver_from_its_exported_tree(tmp_path):
    """--at COMMIT: the commit is exported beside --runs and *its* driver runs there, with the
    paths made absolute and --src / --commit naming the tree (the working tree's driver and
    grid play no part)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "benchmarks" / "cifar_search.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open(os.environ['WHERE'], 'w'))\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "fake driver"], check=True)
    sha = subprocess.run([*git, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    where = tmp_path / "where.json"
    driver = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cifar_search.py")
    env = {**os.environ, "WHERE": str(where)}
    for _ in range(2):  # the second run finds the export made
        subprocess.run([sys.executable, driver, "--at", "HEAD", "--grid", "proxy2", "--runs",
                        "runs/proxy2", "--results", "rows.jsonl", "--data", "d.tar.gz",
                        "--seeds", "3", "--only", "paam key=taylor both=0.3 beta=1"],
                       cwd=repo, env=env, check=True)
        got = json.loads(where.read_text())
        tree = str(repo / "runs" / f"src-{sha}")
        assert got["cwd"] == tree
        a = got["argv"]
        assert "--at" not in a and a[a.index("--src") + 1] == tree
        assert a[a.index("--commit") + 1] == sha
        assert a[a.index("--runs") + 1] == str(repo / "runs" / "proxy2")
        assert a[a.index("--results") + 1] == str(repo / "rows.jsonl")
        assert a[a.index("--data") + 1] == str(repo / "d.tar.gz")
        assert a[a.index("--only") + 1] == "paam key=taylor both=0.3 beta=1"
        assert a.count("--runs") == 1 and a[a.index("--seeds") + 1] == "3"
