"""The report's table at a glance: per model, the newest cost of a checkpoint every iteration on one GPU of each
method, and the engine's newest paired ablation per kind of card."""

from __future__ import annotations

from benchmarks import report


def _matrix(model, method, overhead, tag, card="NVIDIA H200", **extra):
    row = dict(status="ok", model=model, method=method, gpus=1, every_n_steps=1, overhead=overhead, tag=tag, card=card)
    return row | extra


def _engine(model, overhead, run, card, ci):
    return dict(status="ok", kind="ablation", model=model, method="oteacheck-bubbles", variant="bubbles", gpus=1,
                every_n_steps=1, overhead=overhead, overhead_ci95=ci, run=run, card=card)


def test_each_cell_is_the_newest_every_iteration_result_on_one_gpu():
    rows = [
        _engine("gpt2-124m", 1.05, "20261127T1338Z", "NVIDIA H200", [1.0, 1.1]),
        _engine("gpt2-124m", 1.04, "20261128T064346Z", "NVIDIA H200", [1.02, 1.06]),  # newer on an H200
        _engine("gpt2-124m", 1.009, "20261205T231323Z", "NVIDIA H100 80GB HBM3", [1.008, 1.011]),
        dict(_engine("gpt2-124m", 1.0, "20261206T000000Z", "NVIDIA H100 80GB HBM3", None), variant="none"),
        _matrix("gpt2-124m", "torchsnapshot", 15.0, "gpu-compare2"),
        _matrix("gpt2-124m", "torchsnapshot", 14.0, "gpu-compare"),  # older: no run counter in its tag
        _matrix("gpt2-124m", "torchsnapshot", 3.0, "gpu-compare9", gpus=2),  # two GPUs: not this table's
        _matrix("gpt2-124m", "sync-deepspeed", 1.04, "gpu-search7", every_n_steps=300, every_n_steps_requested=300),
        _matrix("gpt2-124m", "oteacheck", 1.2, "gpu-compare"),
        _matrix("bert-large-qa", "oteacheck", 0.999, "gpu-compare13", card="NVIDIA H100 80GB HBM3",
                overhead_paired=0.999, overhead_ci95=[0.906, 1.152]),
        dict(_matrix("bert-large-qa", "dcp-async", None, "gpu-compare14"), status="error"),
    ]
    text = "\n".join(report.summary_section(rows))
    lines = {line.split(" | ")[0]: line.removesuffix(" |") for line in text.splitlines()
             if line.startswith("| gpt2") or line.startswith("| bert")}
    assert set(lines) == {"| gpt2-124m", "| bert-large-qa"}  # only models with a result
    gpt2 = lines["| gpt2-124m"].split(" | ")
    assert len(gpt2) == 2 + len(report.SUMMARY_METHODS)
    assert gpt2[1] == "1.009x [1.008, 1.011] H100; 1.040x [1.020, 1.060] H200"
    assert gpt2[2] == "1.2x, separate processes (H200, `gpu-compare`)"
    assert gpt2[3] == "15x (H200, `gpu-compare2`)"
    assert gpt2[7] == "–"  # synchronous DeepSpeed was measured only at every 300 steps
    bert = lines["| bert-large-qa"].split(" | ")
    assert bert[1] == "–" and bert[2] == "0.999x [0.906, 1.152] paired (H100, `gpu-compare13`)"
    assert bert[4] == "–"  # the failed DCP run is not a result


def test_no_results_no_table():
    assert report.summary_section([]) == []
