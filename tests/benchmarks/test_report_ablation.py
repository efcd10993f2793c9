"""The report keeps the engine ablation's results (``kind: "ablation"``) in their own section and plot, out of the
matrix tables and the matrix plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import report

NONE_MS = [100.0, 101.0, 99.0, 102.0, 98.0, 100.5]


def _ablation(out: Path, variant: str, iter_ms: list[float], notes: list[str] | None = None) -> None:
    median = statistics.median(iter_ms)
    data = {"status": "ok", "kind": "ablation", "card": "Card", "gpus": 1, "model": "m", "variant": variant,
            "method": "none" if variant == "none" else f"oteacheck-{variant}", "iterations": len(iter_ms),
            "iter_ms": iter_ms, "iter_ms_median": median, "iter_ms_mean": statistics.mean(iter_ms),
            "overhead": median / statistics.median(NONE_MS), "snapshot_mib_per_rank": 3422.6, "extra_gpu_mib": 0.0,
            "mib_by_phase": {}, "versions": {"torch": "9.9"},
            "command": "python -m benchmarks.ablation --model m --out X"}
    if variant != "none":
        data.update(every_n_steps=1, stall_ms_median=3.25, capture_ms_median=2.5, copy_gbps_median=54.0,
                    extra_gpu_mib=64.0, mib_by_phase={"backward_block": 2179.4, "forward_block": 1243.2})
    if notes:
        data["notes"] = notes
    (out / f"ablation__m__{variant.replace('+', '-')}__g1.json").write_text(json.dumps(data))


def _matrix_row(out: Path) -> None:
    data = {"tag": "t", "card": "Card", "model": "m", "method": "oteacheck", "gpus": 1, "every_n_steps": 1,
            "status": "ok", "iter_ms_median": 110.0, "iter_ms_p90": 120.0, "overhead": 1.1, "overhead_median": 1.09,
            "command": "python -m benchmarks.run --model m --method oteacheck"}
    (out / "m__oteacheck__g1__n1.json").write_text(json.dumps(data))


def _write_results(results: Path) -> None:
    results.mkdir()
    # written out of report order: the report sorts them
    _ablation(results, "bubbles+coarse", [115.0, 116.0, 114.0, 117.0, 115.5, 116.5], notes=["one GPU"])
    _ablation(results, "bubbles", [102.0, 103.0, 101.0, 104.0, 102.5, 103.5], notes=["one GPU", "bubbles only"])
    _ablation(results, "none", NONE_MS, notes=["one GPU"])
    _ablation(results, "naive", [110.0, 111.0, 109.0, 112.0, 110.5, 111.5], notes=["one GPU"])
    _matrix_row(results)


def _render(tmp_path: Path) -> str:
    results = tmp_path / "results"
    _write_results(results)
    md = tmp_path / "benchmarks.md"
    report.main(["--results", str(results), "--markdown", str(md), "--plots", str(tmp_path / "plots")])
    return md.read_text()


def test_ablation_section_comes_first_with_variants_in_order(tmp_path):
    text = _render(tmp_path)
    section_at = text.index("## Engine ablation: policies interleaved in one run")
    assert section_at < text.index("## Card, matrix `t`")
    section = text[section_at:text.index("## Card, matrix `t`")]
    variant_rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| `")]
    assert variant_rows == ["`none`", "`naive`", "`bubbles`", "`bubbles+coarse`"]
    bubbles_row = next(line for line in section.splitlines() if line.startswith("| `bubbles` "))
    assert "| 1.025x |" in bubbles_row  # 102.75 / 100.25
    assert "fwd-blk 1243, bwd-blk 2179" in bubbles_row  # phases in the order they happen
    assert "python -m benchmarks.ablation --model m --out X" in section
    assert "* one GPU" in section and "* `bubbles`: bubbles only" in section


def test_spread_is_p10_to_p90_of_the_iterations():
    row = {"iter_ms": NONE_MS, "iter_ms_median": 100.25}
    assert report._p10_p90(NONE_MS) == pytest.approx((98.5, 101.5))
    assert report._spread(row) == "98.5–101.5 (3.0%)"


def test_matrix_table_leaves_ablation_rows_out(tmp_path):
    text = _render(tmp_path)
    matrix = text[text.index("## Card, matrix `t`"):text.index("## What is compared")]
    data_rows = [line for line in matrix.splitlines() if line.startswith("| m |")]
    assert len(data_rows) == 1 and "`oteacheck`" in data_rows[0]
    assert "ablation" not in matrix


def test_ablation_plot_is_written_and_matrix_plots_ignore_it(tmp_path):
    pytest.importorskip("matplotlib")
    _render(tmp_path)
    assert (tmp_path / "plots" / "ablation.png").stat().st_size > 0
    only_ablation = [r for r in report.load([tmp_path / "results"], include_smoke=False) if report.is_ablation(r)]
    assert report.plots(only_ablation, tmp_path / "only") == ["ablation.png"]


def test_a_profile_of_the_run_is_shown_under_its_ablation_table(tmp_path):
    results = tmp_path / "results"
    _write_results(results)
    profile = {"model": "m", "gpus": 1, "run": "", "rounds": 5, "iterations": {"none": 10, "bubbles": 5},
               "differences": {"bubbles": {"training_thread_ms": {"none": 60.0, "bubbles": 63.5},
                                           "largest_ms": [{"name": "cudaLaunchKernel", "none": 9.0, "bubbles": 11.25, "delta": 2.25}]}}}
    (results / "profile__m__g1__r.json").write_text(json.dumps(profile))
    md = tmp_path / "benchmarks.md"
    report.main(["--results", str(results), "--markdown", str(md), "--plots", str(tmp_path / "plots")])
    text = md.read_text()
    section = text[text.index("## Engine ablation"):text.index("## Card, matrix `t`")]
    assert section.index("| `bubbles+coarse` |") < section.index("Where the time went, in 5 more rounds")
    assert "`bubbles` (5 iterations against 10): training thread 60.0 → 63.5 ms" in section
    assert "| `cudaLaunchKernel` | 9.000 | 11.250 | +2.250 |" in section
    # a profile is not a result row of the matrix
    assert "Where the time went" not in text[text.index("## Card, matrix `t`"):]


def test_where_the_gpu_was_behind_the_host_is_listed_per_variant_in_iteration_order(tmp_path):
    results = tmp_path / "results"
    _write_results(results)
    path = results / "ablation__m__none__g1.json"
    data = json.loads(path.read_text())
    data["gpu_behind_share"] = {"iteration_start": 0.0, "forward_end": 0.75}
    path.write_text(json.dumps(data))
    md = tmp_path / "benchmarks.md"
    report.main(["--results", str(results), "--markdown", str(md), "--plots", str(tmp_path / "plots")])
    lines = md.read_text().splitlines()
    assert "* `none`: iter-start 0%, fwd-end 75%" in lines
    assert not any(line.startswith("* `bubbles`: iter-start") for line in lines)  # recorded for none only
