"""The profile comparison of benchmarks.attribution on made-up per-iteration sums."""

from __future__ import annotations

import pytest

from benchmarks import attribution


def test_compare_means_kept_iterations_per_variant_and_ranks_names_by_their_change():
    per_step = {
        10: {"aten::mm": 1000.0, attribution.PYTHON: 3000.0, "[gpu] kernels": 9000.0},
        11: {"aten::mm": 3000.0, attribution.PYTHON: 3000.0},
        12: {"aten::mm": 2000.0, attribution.PYTHON: 5000.0, "cudaStreamSynchronize": 1500.0, "[thread 7] aten::copy_": 400.0},
        13: {"aten::mm": 99000.0},  # not kept
    }
    variant_of = {10: "none", 11: "none", 12: "bubbles", 13: "bubbles"}
    result = attribution.compare(per_step, variant_of, kept={10, 11, 12})
    assert result["iterations"] == {"none": 2, "bubbles": 1}
    difference = result["differences"]["bubbles"]
    rows = {row["name"]: row for row in difference["largest_ms"]}
    # milliseconds, means over the kept iterations: a name missing in an iteration counts as zero there
    assert rows[attribution.PYTHON] == {"name": attribution.PYTHON, "none": 3.0, "bubbles": 5.0, "delta": 2.0}
    assert rows["aten::mm"]["delta"] == pytest.approx(0.0)
    assert rows["[gpu] kernels"] == {"name": "[gpu] kernels", "none": 4.5, "bubbles": 0.0, "delta": -4.5}
    assert [row["name"] for row in difference["largest_ms"]][:2] == ["[gpu] kernels", attribution.PYTHON]
    # the training thread's sum leaves out other threads and the GPU
    assert difference["training_thread_ms"] == {"none": pytest.approx(5.0), "bubbles": pytest.approx(8.5)}
    assert difference["other_threads_ms"] == {"[thread 7]": {"none": 0.0, "bubbles": pytest.approx(0.4)}}
