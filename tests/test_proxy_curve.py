"""benchmarks/proxy_curve.py: the uniform curve's reading and the paired statistics."""

import importlib.util
import math
import os

import pytest

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "proxy_curve.py")
_spec = importlib.util.spec_from_file_location("proxy_curve", _path)
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)


def test_curve_is_linear_in_log_cost_and_never_extrapolates_upwards():
    pts = [(100.0, 70.0), (400.0, 76.0), (1000.0, 78.0)]
    assert pc.curve_at(pts, 100.0) == 70.0 and pc.curve_at(pts, 1000.0) == 78.0
    assert pc.curve_at(pts, 200.0) == pytest.approx(73.0)  # halfway in log between 100 and 400
    assert pc.curve_at(pts, 1001.0) is None  # dearer than dense: no reading
    assert pc.curve_at(pts, 98.0) is None  # 2% below the cheapest point: no reading


def test_just_below_the_cheapest_point_reads_that_point():
    pts = [(80_752.0, 74.66), (269_722.0, 77.94)]
    assert pc.curve_at(pts, 80_376.0) == 74.66  # 0.47% fewer params: read at the point
    assert pc.curve_at(pts, 80_752.0 * 0.989) is None


def test_paired_mean_std_and_t():
    m, sd, p = pc.paired([1.0, 2.0, 3.0])
    assert m == 2.0 and sd == pytest.approx(1.0)
    # t = 2 / (1 / sqrt 3) = 3.464 with 2 degrees of freedom: two-sided p = 0.0742
    assert p == pytest.approx(0.0742, abs=5e-4)
    assert pc.paired([1.5])[2] is None
    assert not math.isnan(pc.paired([0.5, 0.5])[0])


def test_against_pairs_by_seed_and_tests_the_margin():
    rows = [{"setting": s, "seed": seed, "val_top1": acc, "params": 10, "flops": 20}
            for s, seed, acc in [("u", 0, 0.70), ("u", 1, 0.72), ("u", 2, 0.71), ("u", 3, 0.60),
                                 ("x", 0, 0.72), ("x", 1, 0.74), ("x", 2, 0.735)]]
    pairs = pc.against(rows, "x", "u")
    assert [seed for seed, _, _ in pairs] == [0, 1, 2]  # seed 3 has no "x": left out
    text = pc.against_text(rows, "x", "u", margin=1.0)
    assert "+2.17 ± 0.29 pts, n = 3" in text
    assert pc.one_sided_above([2.0, 2.5, 2.0], 1.0) < 0.05 < pc.one_sided_above([2.0, 2.5, 2.0],
                                                                                 2.0)
    assert pc.one_sided_above([1.5], 1.0) is None


def test_replace_table_swaps_only_the_matching_table():
    new = "| setting | seeds |\n|---|---|\n| paam | 5 |"
    text = ("intro\n\n| other | t |\n|---|---|\n| x | 1 |\n\n"
            "| setting | seeds |\n|---|---|\n| paam | 3 |\n| old | 1 |\n\n(after)\n")
    out = pc.replace_table(text, new)
    assert "| paam | 5 |" in out and "| old | 1 |" not in out and "| paam | 3 |" not in out
    assert "| x | 1 |" in out and out.endswith("\n\n(after)\n")
    with pytest.raises(ValueError, match="found 0"):
        pc.replace_table("no table here\n", new)


def test_the_curve_is_uniform_thinning_of_the_default_coupling_only():
    """Uniform thinning with grouped coupling cuts the residual stages too: another family of
    networks, not a point of the curve every other run is read against."""
    assert pc.is_curve({"setting": "dense"}) and pc.is_curve({"setting": "uniform keep=0.15"})
    assert pc.is_curve({"setting": "uniform latency=0.5"})
    assert not pc.is_curve({"setting": "uniform grouped keep=0.15"})
    assert not pc.is_curve({"setting": "paam key=taylor same-pipeline uniform keep=0.15"})
