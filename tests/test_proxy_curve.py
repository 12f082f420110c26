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
