"""benchmarks/cifar_search.py: every grid setting is a command paam-train accepts.

A setting with a mistyped flag or a forbidden combination fails only when its run starts, often
in a background lane an hour later; here each is parsed and resolved as paam-train would.  The
settings that read an upstream run (a fork's pre-selection state, a retrain's widths) may fail
for that one reason only: the upstream run folder does not exist here."""

import importlib.util
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
