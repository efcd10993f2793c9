"""Benchmark harness: checkpointing methods compared on the same Lightning + DeepSpeed ZeRO-2 training runs.

``python -m benchmarks.run`` runs one (method, model, GPU count); ``python -m benchmarks.matrix`` runs many, each
in its own process, and fills in the ratios against no checkpointing; ``python -m benchmarks.report`` turns a
results folder into ``docs/benchmarks.md`` and plots. See ``docs/benchmarks.md``.
"""
