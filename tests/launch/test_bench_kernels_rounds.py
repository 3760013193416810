"""`longreach bench kernels --rounds`: the median row per method over its rounds (pure function, CPU)."""
import math

from longreach.launch.bench.kernels import _median_rows


def _row(method, rnd, f_ms, fb_ms, flops=1e12):
    return {"method": method, "seqlen": 8, "sparse": False, "round": rnd, "fwd_ms": f_ms, "fwdbwd_ms": fb_ms,
            "fwd_tflops": flops / f_ms / 1e9, "fwdbwd_tflops": 3.5 * flops / fb_ms / 1e9, "vs_ours": {"out": 0.1}}


def test_median_rows_per_method_in_order():
    rows = [_row("a", 0, 3.0, 9.0), _row("b", 0, 1.0, 4.0), _row("a", 1, 1.0, 7.0), _row("b", 1, 2.0, 5.0),
            _row("a", 2, 2.0, 8.0), _row("b", 2, 9.0, 6.0)]
    med = _median_rows(rows)
    assert [r["method"] for r in med] == ["a", "b"]
    a, b = med
    assert (a["fwd_ms"], a["fwdbwd_ms"], a["rounds"], a["round"]) == (2.0, 8.0, 3, "median")
    assert (b["fwd_ms"], b["fwdbwd_ms"]) == (2.0, 5.0)
    assert math.isclose(a["fwd_tflops"], 1e12 / 2.0 / 1e9) and math.isclose(b["fwdbwd_tflops"], 3.5e12 / 5.0 / 1e9)
    assert "vs_ours" not in a  # the agreement check is per run, not per round


def test_median_rows_failed_method_has_no_throughput():
    rows = [{"method": "x", "round": r, "fwd_ms": math.nan, "fwdbwd_ms": math.nan, "fwd_tflops": None,
             "fwdbwd_tflops": None} for r in range(2)]
    (m,) = _median_rows(rows)
    assert m["fwd_tflops"] is None and m["fwdbwd_tflops"] is None
