"""Turns a results folder into ``docs/benchmarks.md`` (tables) and ``docs/benchmarks/*.png`` (plots).

    python -m benchmarks.report --results docs/benchmarks/results

Two kinds of result: the matrix's (``benchmarks.run``, one process per method) and the engine ablation's
(``benchmarks.ablation``, ``kind: "ablation"``: all variants interleaved in one process), each in its own tables.

Only measured results go in: smoke results (tiny models on CPU) are left out unless ``--include-smoke`` is given
(for checking the report itself, never for committing), and estimated intervals are shown as estimates.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

HOW_TO = """\
## How to produce them

On the GPU machine (no network; the wheels it lacks travel in the git-ignored `.whl/`), about 9 minutes, by
priority (issue 3's rows first, then as much of issue 5's matrix as fits):

```bash
bash scripts/device_wheels.sh                    # on the development machine: .whl/ for the GPU machine
OUT=/some/folder bash benchmarks/gpu_run.sh      # BENCH_TOTAL_S=540 by default
cp /some/folder/results/*.json docs/benchmarks/results/ && python -m benchmarks.report
```

Paired ablations only, packed into one archive (`$OUT/ablation.tar.gz`), one model after another within a budget:

```bash
MODELS="gpt2-124m resnet50" VARIANTS=none,bubbles,bubbles+late ROUNDS=16 BUDGET_S=520 OUT=/some/folder \
    bash benchmarks/gpu_ablation.sh
```

Issue 5's runs at given intervals (`model:method:interval`; a run holds three checkpoints, and its model's baseline
runs `BASELINE_STEPS` iterations, 400 by default), packed into `$OUT/intervals.tar.gz`:

```bash
SPECS="gpt2-124m:checkfreq:700 vit-b16:sync-deepspeed:632" TAG=gpu-search23 BUDGET_S=540 OUT=/some/folder \
    bash benchmarks/gpu_intervals.sh
```

Or by hand, on any machine with CUDA GPUs:

```bash
# the engine's ablation: its policies interleaved in one process per model, against no checkpointing
python -m benchmarks.ablation --model gpt2-124m --gpus 1 \\
    --variants none,naive,eager,bubbles --out docs/benchmarks/results
# ... and where a policy's extra time goes: 5 more rounds under the torch profiler, summed per iteration by operator
# and CUDA runtime call (profile__<model>__g<gpus>__<run>.json; the profiled rounds are left out of the overheads)
python -m benchmarks.ablation --model gpt2-124m --gpus 1 --variants none,bubbles \\
    --profile-rounds 5 --out docs/benchmarks/results
# issue 3: the engine against no checkpointing and its ablations, one GPU
python -m benchmarks.matrix --models gpt2-124m,gpt2-355m \\
    --methods none,oteacheck-naive,oteacheck-eager,oteacheck --out docs/benchmarks/results --budget-s 540
# issue 5: the comparison (add --search-5pct for each method's shortest interval within 5%)
python -m benchmarks.matrix --models gpt2-124m,gpt2-355m,bert-large-qa,resnet50,vit-b16 \\
    --methods oteacheck,sync-torch-save,sync-deepspeed,checkfreq,torchsnapshot,dcp-async,lightning-async \\
    --recovery oteacheck,sync-torch-save,sync-deepspeed,checkfreq,dcp-async --out docs/benchmarks/results
# one row
python -m benchmarks.run --model gpt2-124m --method oteacheck --gpus 1 --steps 60 --warmup 10 --out DIR
# this page
python -m benchmarks.report --results docs/benchmarks/results
# the CPU smoke version of the harness (tiny models; what CI runs in tests/benchmarks/test_smoke.py)
python -m benchmarks.matrix --smoke --models gpt2-124m --methods none,oteacheck,sync-torch-save --steps 4 --warmup 1 --out /tmp/smoke
```
"""

METHODS_TEXT = """\
## What is compared

Models, built from configurations (no downloaded weights): GPT-2 124M, 355M and 774M (Hugging Face
`GPT2LMHeadModel`, sequence 1024, batch 8), BERT-large with a question-answering head (`BertForQuestionAnswering`,
sequence 384, batch 16), ResNet-50 and ViT-B/16 (torchvision, 224 px, batch 64). Batches are per GPU.

Every run trains the model with Lightning and DeepSpeed ZeRO-2, bf16 (`precision="bf16-mixed"`), AdamW, on the
same synthetic batches (made once on the GPU from a fixed seed), for `warmup` iterations and then `steps` measured
ones. Each method runs in its own process.

| method | what it does | strategy |
| --- | --- | --- |
| `none` | no checkpoint (baseline of the OTeaCheck rows) | `OTeaCheckStrategy`, snapshots off |
| `none-deepspeed` | no checkpoint (baseline of the other rows) | Lightning `DeepSpeedStrategy` |
| `oteacheck` | in-memory snapshot every `every_n_steps`, persisted to local disk every `persist_every_n_steps` | `OTeaCheckStrategy` |
| `oteacheck-naive`, `oteacheck-eager` | the same with `OTeaCheckpointIO(schedule="naive" / "eager", staging_mib=64)`: per-tensor copies at iteration start; bucket partitions without bubble scheduling | `OTeaCheckStrategy` |
| `sync-torch-save` | `torch.save` of the rank's state + `fsync`, on the training thread | `DeepSpeedStrategy` |
| `sync-deepspeed` | `trainer.save_checkpoint`, i.e. DeepSpeed's `engine.save_checkpoint` | `DeepSpeedStrategy` |
| `checkfreq` | CheckFreq (FAST'21), written from the paper: pipelined GPU-side snapshot, background persist, adaptive interval within 5% | `DeepSpeedStrategy` |
| `torchsnapshot` | `Snapshot.async_take`, one take in flight | `DeepSpeedStrategy` |
| `dcp-async` | `torch.distributed.checkpoint.async_save` with `DefaultStager` (pinned, shared-memory staging) where the installed torch has it; staging waited for before the next optimizer step | `DeepSpeedStrategy` |
| `lightning-async` | Lightning's `AsyncCheckpointIO`. `DeepSpeedStrategy.save_checkpoint` ignores CheckpointIO plugins, so the plugin alone does nothing under DeepSpeed; the run uses the smallest user fix, a `DeepSpeedStrategy` subclass whose `save_checkpoint` hands Lightning's checkpoint dict to the plugin, one file per rank, with at most one save in flight (the plugin clones every tensor on the GPU and queues without bound) | `DeepSpeedStrategy` subclass (`benchmarks/methods.py`) |

Unless noted, the methods save the same tensors, this rank's DeepSpeed training state (fp32 master partition,
AdamW moments, buffers); `sync-deepspeed` saves DeepSpeed's format and `lightning-async` Lightning's dict.

## What the columns mean

* **iter ms**: median and p90 of the measured iterations, from the start of one training batch to the start of
  the next (CUDA events on the training stream, so neither a host stall nor device work is missed).
* **overhead**: mean iteration time over the baseline's (same model, GPU count and matrix run): the throughput
  cost, which also counts the iterations between checkpoints; **ovh. median**: the same with medians. OTeaCheck
  at every iteration (*paired*): measured within its own run, as in the ablation below, blocks of iterations with
  and without snapshots taking turns; the median ratio of each snapshot block to the block before it, with its 95%
  bootstrap interval (separate processes of one configuration drifted by up to 20%, more than that cost).
* **stall ms**: per checkpoint, how long the training thread was held (OTeaCheck: its `oteacheck/stall_ms`).
* **ckpt/h**: checkpoints taken per hour of training at the measured speed (OTeaCheck: snapshots sealed in
  memory; the others: saves begun).
* **extra GPU MiB**: peak allocated GPU memory over the baseline's (`torch.cuda.max_memory_allocated`).
* **host RSS MiB**: peak resident memory of the rank-0 process (shared-memory slots it touched included).
* **durable s**: median time from the end of a checkpoint's step until it is complete on disk (fsynced by
  OTeaCheck's persister, `sync-torch-save`, `checkfreq` and DCP's writer; `sync-deepspeed`, `lightning-async` and
  `torchsnapshot` write the way those libraries do).
* **recovery s (memory / disk)**: restart of the training process to the end of its first step, resuming from the
  in-memory tier (a process crash; the node survives) or from disk (a node loss); **start s** is the same for a
  fresh start with no checkpoint; **in fit s**: the same from the `trainer.fit` call on, i.e. without process
  start-up and imports (engine set-up, finding and loading the checkpoint, first iteration). **lost steps**: steps
  lost at the simulated failure (the process dies at the start of the iteration after the measured ones, before
  anything of that iteration ran; in-flight background writes are lost with it).
"""

ABLATION_TEXT = """\
## Engine ablation: policies interleaved in one run

One process per model (`benchmarks/ablation.py`) trains and switches between the variants every block of
iterations, so that every variant shares the process, the GPU clocks and the memory layout, which separate
processes do not: each policy block follows a block of `none`, the policies taking turns in a rotated order. The
first iterations of each block and the last one (it ends with the next variant's first snapshot) are left out; each
run's heading gives its block length, the iterations left out at each block's start and the pairs per policy. The
p10–p90 spread of the `none` rows shows how much the iteration time moves within one run without any
checkpointing; the bracketed interval, not that spread, says whether a policy's difference is resolved.

Variants: `none` (no snapshot), `naive` (per-tensor copies at iteration start), `eager` (bucket partitions at
iteration start), `bubbles` (the engine: copies placed in the iteration's idle windows, joined into as many issue
points as 0.3% of the iteration pays for at the measured cost of one issue call); `+fine`: one issue call per
window; `+coarse`: without per-block windows; `+frontload`: a window also takes what the later windows cannot
hold; `+noallreduce`: no copies in the windows where gradients are reduced; `+dry`: plans and schedules but copies
nothing (the training thread's share of the cost); `+pump`: a thread feeds the copy stream; `+inline`: the
training thread queues the copies (by default the issuer thread does); `probe+end|start|fwd|bwd|side`: no snapshot,
but `--probe-ms` of host work on the training thread at the step's end, iteration start, after the forward pass or
after backward, or on a thread of its own from the forward pass's end (the price of host work at each place). A
snapshot is taken every iteration (but in `none` and the probes). **iter ms**: GPU time from one iteration's start to the
next's; **p10–p90**: in ms, with its width as a share of the median; **overhead**: the median over the policy's
blocks of its block median over that of the `none` block right before it, with a 95% bootstrap interval in
brackets; **stall ms**: per snapshot, the optimizer step's wait for the copies plus the training
thread's time to capture and seal it; **capture ms**: the capture alone; **issue calls (ms)**: the training
thread's calls that queued one snapshot's copies, and its time in them (recorded since the issue-cost groups), then
`+` the issuer thread's CPU time making the copy calls (recorded since 749fc1d);
**host CPU ms**: per iteration, the CPU time of the training thread and of the whole process (every thread),
median (recorded since bdfb793; a wait for the GPU that spins counts as CPU time), and in brackets the training
thread's time in `torch.cuda.synchronize` and `Tensor.item` (recorded in runs after 2026-11-28 03:00 UTC);
**copy GB/s**: device-to-host copy rate;
**extra GPU MiB**: peak allocated GPU memory over that of the snapshot-free warm-up (the staging ring; one figure
per run, as the peak is the process's); **MiB per phase**: what one snapshot copied in each phase window
(`iter-start`, `fwd-start`, `fwd-blk` between forward blocks, `fwd-end`, `bwd-blk` between backward blocks,
`bucket` after a gradient bucket's reduction, `bwd-end`, `pre-step`).
"""

# the phases of one iteration in the order they happen (``oteacheck_lightning.bubbles.Phase``), as short labels
PHASE_LABELS = {"iteration_start": "iter-start", "forward_start": "fwd-start", "forward_block": "fwd-blk",
                "forward_end": "fwd-end", "backward_block": "bwd-blk", "bucket_reduced": "bucket",
                "backward_end": "bwd-end", "before_step": "pre-step", "after_step": "post-step"}
ABLATION_VARIANT_ORDER = ("none", "naive", "eager", "bubbles")
VERSION_KEYS = ("torch", "lightning", "deepspeed", "cuda", "python", "transformers", "torchvision", "oteacheck_commit")


def _json_objects(dirs: list[Path], pattern: str) -> Iterator[tuple[Path, dict]]:
    """The JSON objects in the files of ``dirs`` matching ``pattern``; unreadable files and other JSON are skipped."""
    for d in dirs:
        for path in sorted(Path(d).glob(pattern)):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                yield path, data


def load(dirs: list[Path], include_smoke: bool) -> list[dict]:
    rows = []
    for path, data in _json_objects(dirs, "*.json"):
        if "method" not in data or "model" not in data:
            continue
        if data.get("smoke") and not include_smoke:
            continue
        data["_file"] = path.name
        rows.append(data)
    return rows


def load_profiles(dirs: list[Path]) -> dict[tuple, dict]:
    """The ablation's profile attributions (``profile__*.json``) by (model, GPUs, run)."""
    return {(data.get("model"), data.get("gpus"), data.get("run")): data
            for _, data in _json_objects(dirs, "profile__*.json") if "differences" in data}


def load_contention(dirs: list[Path]) -> list[dict]:
    """The results of ``benchmarks.host_contention`` measured on a GPU (its CPU smoke runs measure nothing)."""
    return [data for _, data in _json_objects(dirs, "host_contention__*.json")
            if data.get("kind") == "host_contention" and not data.get("smoke") and data.get("wall_ratio")]


def _coverage_note(result: dict) -> str:
    if "retries" not in result:  # runs before the queue grew on demand: uncovered pieces were in the ratios
        return " (ratios are lower bounds where the work outlasted its copies)"
    return f" ({result['retries']} pieces retried with longer queues; uncovered ones are left out of the ratios)"


def contention_section(results: list[dict]) -> list[str]:
    """Per run: each kind of host work's time while the GPU copies, over its time idle in the same round."""
    if not results:
        return []
    parts = ["## Does a copy in flight slow the host?", "",
             "`python -m benchmarks.host_contention`: host work timed alone (`idle`) and while the GPU copies "
             "device to host (`d2h`, the engine's copy), host to device (`h2d`) or device to device (`d2d`); each "
             "piece of work against idle in the same round, median ratio and 95% bootstrap interval. `python` is a "
             "pure-Python loop, `memcpy` one single-threaded host copy, `launch` tiny kernel launches (host time "
             "only).", ""]
    for r in sorted(results, key=lambda r: r.get("run", "")):
        conditions = sorted({c for per in r["wall_ratio"].values() for c in per})
        gbps = ", ".join(f"{c} {v:.0f}" for c, v in sorted((r.get("copy_gbps") or {}).items()))
        parts += [f"### {r.get('card', '?')}, host {r.get('host_cpu') or '?'} ({r.get('cpus', '?')} CPUs), "
                  f"{r.get('rounds', '?')} rounds, run {r.get('run', '?')}", "",
                  f"Copy GB/s: {gbps or '-'}; the copies outlasted the work in {r.get('covered_fraction', 0):.0%} of "
                  f"the pieces{_coverage_note(r)}. {_versions_line([r])}. Command: `{r.get('command', '?')}`", "",
                  "| work | idle ms | " + " | ".join(f"`{c}`" for c in conditions) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in conditions) + " |"]
        for work, per in r["wall_ratio"].items():
            cells = []
            for c in conditions:
                s = per.get(c)
                ci = s and s.get("ci95")
                cells.append("–" if not s else f"{s['median']:.3f}x" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            parts.append(f"| {work} | {_f(r.get('idle_ms_median', {}).get(work))} | " + " | ".join(cells) + " |")
        parts.append("")
    return parts


def profile_table(profile: dict, top: int = 12) -> list[str]:
    """Per policy, the names whose time per iteration changed most against no checkpointing, in the profiled rounds."""
    parts = [f"Where the time went, in {profile.get('rounds', '?')} more rounds under the torch profiler (its own cost "
             "is in every number; read the differences): milliseconds per iteration of self CPU time on the training "
             "thread by operator or CUDA runtime call, on other threads as `[thread id]`, GPU busy time as `[gpu]` (summed over "
             "streams). The profiler now and then stops to flush its buffers (`Buffer Flush`, `Activity Buffer Request`, "
             "and the calls it interrupts): over a few iterations one flush moves a mean by milliseconds.", ""]
    for variant, d in profile["differences"].items():
        train = d["training_thread_ms"]
        parts += [f"`{variant}` ({profile['iterations'].get(variant, 0)} iterations against "
                  f"{profile['iterations'].get('none', 0)}): training thread {train['none']:.1f} → {train[variant]:.1f} ms", "",
                  f"| name | none | {variant} | difference |", "| --- | --- | --- | --- |"]
        parts += [f"| `{r['name']}` | {r['none']:.3f} | {r[variant]:.3f} | {r['delta']:+.3f} |" for r in d["largest_ms"][:top]]
        parts.append("")
    return parts


def is_ablation(row: dict) -> bool:
    return row.get("kind") == "ablation"


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _overhead_cell(r: dict) -> str:
    """The ablation overhead and its 95% interval over the pairs."""
    cell = _f(r.get("overhead"), "{:.3f}x")
    interval = r.get("overhead_ci95")
    if interval and r.get("variant") != "none":
        cell += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return cell


def table(rows: list[dict]) -> str:
    head = ("| model | GPUs | method | every n | iter ms (median / p90) | overhead | ovh. median | stall ms | ckpt/h "
            "| extra GPU MiB | host RSS MiB | durable s | recovery s (memory / disk) | start s "
            "| in fit s (memory / disk / fresh) | lost steps | note |")
    lines = [head, "|" + "|".join([" --- "] * 17) + "|"]
    order = {m: i for i, m in enumerate(["none", "oteacheck-naive", "oteacheck-eager", "oteacheck", "none-deepspeed",
                                         "sync-torch-save", "sync-deepspeed", "checkfreq", "torchsnapshot", "dcp-async",
                                         "lightning-async"])}
    for r in sorted(rows, key=lambda r: (r["model"], r.get("gpus", 1), order.get(r["method"], 99), r.get("every_n_steps") or 0)):
        status = r.get("status")
        note = ""
        if status == "error":
            note = "**did not run**: " + str(r.get("error", ""))[:200].replace("|", "/")
        elif status == "estimated":
            note = "estimate, not measured"
        elif r.get("stopped_early"):
            note = f"time limit: {r.get('steps_measured')} iterations measured"
        if r.get("errors"):
            note += (" " if note else "") + "errors: " + "; ".join(r["errors"])[:200].replace("|", "/")
        ovh = _f(r.get("overhead"), "{:.3f}x")
        if status == "estimated":
            ovh = f"~{ovh} (est.)"
        elif r.get("paired"):
            ovh = _overhead_cell(r) + " paired"
            p = r["paired"]
            note += (" " if note else "") + (f"paired in its own run: {p.get('pairs')} pairs of {p.get('block')}-iteration "
                                             f"blocks; against the baseline's process {_f(r.get('overhead_separate'), '{:.3f}x')}")
        elif r.get("overhead_in_run") is not None:
            note += (" " if note else "") + (f"in its run (against its quiet iterations, `benchmarks/in_run.py`): "
                                             f"{r['overhead_in_run']:.3f}x, "
                                             f"{_f(r.get('cost_ms_per_checkpoint_in_run'), '{:.0f}')} ms a checkpoint")
        lines.append("| " + " | ".join([
            r["model"], str(r.get("gpus")), f"`{r['method']}`", str(r.get("every_n_steps")),
            f"{_f(r.get('iter_ms_median'))} / {_f(r.get('iter_ms_p90'))}", ovh, _f(r.get("overhead_median"), "{:.3f}x"),
            _f(r.get("stall_ms_median")), _f(r.get("checkpoints_per_hour"), "{:.0f}"), _f(r.get("extra_gpu_mib"), "{:.0f}"),
            _f(r.get("host_rss_mib"), "{:.0f}"), _f(r.get("durable_s"), "{:.2f}"),
            f"{_f(r.get('recovery_s_memory'))} / {_f(r.get('recovery_s_disk'))}", _f(r.get("start_s")),
            f"{_f(r.get('recovery_fit_to_first_step_s_memory'))} / {_f(r.get('recovery_fit_to_first_step_s_disk'))}"
            f" / {_f(r.get('fit_to_first_step_s'))}",
            _f(r.get("work_lost_steps"), "{}"), note]) + " |")
    return "\n".join(lines)


def _variant(row: dict) -> str:
    return row.get("variant") or row["method"]


def _variant_key(row: dict) -> tuple:
    variant = _variant(row)
    rank = ABLATION_VARIANT_ORDER.index(variant) if variant in ABLATION_VARIANT_ORDER else len(ABLATION_VARIANT_ORDER)
    return rank, variant


def ablation_runs(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Ablation rows by (card, model, gpus, run), i.e. by the process that measured them, variants in report order."""
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if is_ablation(r):
            runs[(r.get("card") or "?", r["model"], r.get("gpus", 1), r.get("run") or "")].append(r)
    return {key: sorted(rs, key=_variant_key) for key, rs in sorted(runs.items())}


def _p10_p90(values: list[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def _spread_of(row: dict) -> tuple[float, float, float | None] | None:
    """The p10 and p90 of the row's iterations, and their width over the median (None without a median)."""
    spread = _p10_p90(row.get("iter_ms") or [])
    if spread is None:
        return None
    median = row.get("iter_ms_median")
    return spread[0], spread[1], (spread[1] - spread[0]) / median if median else None


def _spread(row: dict) -> str:
    spread = _spread_of(row)
    if spread is None:
        return "–"
    low, high, share = spread
    return f"{low:.1f}–{high:.1f}" + (f" ({share:.1%})" if share is not None else "")


def _mib_by_phase(by_phase: dict[str, float] | None) -> str:
    if not by_phase:
        return "–"
    order = list(PHASE_LABELS)
    phases = sorted(by_phase, key=lambda p: (order.index(p) if p in order else len(order), p))
    return ", ".join(f"{PHASE_LABELS.get(p, p)} {by_phase[p]:.0f}" for p in phases)


def _issue_cell(row: dict) -> str:
    """Issue calls per snapshot and the training thread's time in them (recorded since the issue-cost groups), plus
    the issuer thread's (recorded since 749fc1d)."""
    if row.get("issues_median") is None:
        return "–"
    issuer = f" + {row['issuer_ms_median']:.2f}" if row.get("issuer_ms_median") is not None else ""
    return f"{row['issues_median']:.0f} ({row['issue_ms_median']:.2f}{issuer})"


def ablation_table(rows: list[dict]) -> str:
    head = ("| variant | iterations | iter ms median | mean | p10–p90 ms | overhead | stall ms | capture ms "
            "| issue calls (ms) | host CPU ms (training / process) | copy GB/s | extra GPU MiB | MiB per phase |")
    lines = [head, "|" + "|".join([" --- "] * 13) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            f"`{_variant(r)}`", str(len(r["iter_ms"]) if r.get("iter_ms") else r.get("iterations")),
            _f(r.get("iter_ms_median")), _f(r.get("iter_ms_mean")), _spread(r), _overhead_cell(r),
            _f(r.get("stall_ms_median")), _f(r.get("capture_ms_median")), _issue_cell(r), _cpu_cell(r), _f(r.get("copy_gbps_median")),
            _f(r.get("extra_gpu_mib"), "{:.0f}"), _mib_by_phase(r.get("mib_by_phase"))]) + " |")
    return "\n".join(lines)


def _cpu_cell(r: dict) -> str:
    if r.get("train_cpu_ms_median") is None:
        return "–"
    cell = f"{_f(r['train_cpu_ms_median'])} / {_f(r.get('process_cpu_ms_median'))}"
    if r.get("sync_wait_ms_median") is not None:
        cell += f" (GPU waits {_f(r['sync_wait_ms_median'])})"
    return cell


def _versions_line(rows: list[dict]) -> str:
    v = next((r.get("versions") for r in rows if r.get("versions")), {}) or {}
    return "Versions: " + ", ".join(f"{k} {v[k]}" for k in VERSION_KEYS if v.get(k))


def _behind_lines(rows: list[dict]) -> list[str]:
    """Per variant, where the GPU was behind the host (recorded since the ablation asked its CUDA events)."""
    return [f"* `{_variant(r)}`: " + ", ".join(f"{PHASE_LABELS.get(p, p)} {share:.0%}" for p, share in r["gpu_behind_share"].items())
            for r in rows if r.get("gpu_behind_share")]


def _ablation_notes(rows: list[dict]) -> list[str]:
    """A note every variant carries is said once; one that only some carry names them."""
    variants_of: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for note in r.get("notes") or []:
            variants_of[note].append(_variant(r))
    return [note if len(variants) == len(rows) else ", ".join(f"`{v}`" for v in variants) + ": " + note
            for note, variants in variants_of.items()]


def ablation_section(rows: list[dict], profiles: dict[tuple, dict] | None = None) -> list[str]:
    runs = ablation_runs(rows)
    if not runs:
        return []
    parts = [ABLATION_TEXT]
    for (card, model, gpus, run), rs in runs.items():
        snapshot_mib = next((r["snapshot_mib_per_rank"] for r in rs if r.get("snapshot_mib_per_rank")), None)
        snapshot = f", snapshot {snapshot_mib:.0f} MiB per rank" if snapshot_mib else ""
        run_label = f", run {run}" if run else ""
        design = next((r["design"] for r in rs if r.get("design")), None)
        if design:
            run_label += f" (blocks of {design['block']}, first {design['skip']} left out, {design['rounds']} pairs per policy)"
        parts += [f"### {model}, {gpus} GPU{'s' if gpus != 1 else ''}, {card}{snapshot}{run_label}", ""]
        conditions = sorted({r["run_conditions"] for r in rs if r.get("run_conditions")})
        parts += [*(f"Conditions: {c}" for c in conditions), *([""] if conditions else [])]
        parts += [ablation_table(rs), "", _versions_line(rs), "", "```"]
        parts += sorted({r["command"] for r in rs if r.get("command")})
        parts += ["```", ""]
        behind = _behind_lines(rs)
        if behind:
            parts += ["Share of iterations in which the GPU had not yet reached the phase before (the host led there):", "",
                      *behind, ""]
        notes = _ablation_notes(rs)
        if notes:
            parts += ["Notes:", ""] + [f"* {n}" for n in notes] + [""]
        profile = (profiles or {}).get((model, gpus, run))
        if profile:
            parts += profile_table(profile)
    return parts


def ablation_plot(rows: list[dict], path: Path, plt: Any) -> bool:
    """One panel per run: every measured iteration of each variant, so the spread shows, not only the median."""
    runs = ablation_runs([r for r in rows if r.get("iter_ms")])
    if not runs:
        return False
    cols = min(3, len(runs))
    fig, axes = plt.subplots(math.ceil(len(runs) / cols), cols, figsize=(4.2 * cols, 3.6 * math.ceil(len(runs) / cols)),
                             squeeze=False)
    jitter = random.Random(0)  # fixed seed: the same results give the same picture
    for ax, ((card, model, gpus, run), rs) in zip(axes.flat, runs.items()):
        ax.boxplot([r["iter_ms"] for r in rs], whis=(10, 90), showfliers=False, widths=0.5)
        # a few very slow iterations would squash the boxes: the axis stops above the p90s, their values are written
        top = 1.3 * max(spread[1] if (spread := _p10_p90(r["iter_ms"])) else max(r["iter_ms"]) for r in rs)
        for x, r in enumerate(rs, start=1):
            ax.plot([x + jitter.uniform(-0.15, 0.15) for _ in r["iter_ms"]], r["iter_ms"], ".", color="tab:blue",
                    alpha=0.5, markersize=4)
            above = sorted(v for v in r["iter_ms"] if v > top)
            if above:
                ax.annotate("↑ " + ", ".join(f"{v:.0f}" for v in above), (x, top), ha="center", va="top", fontsize=7)
        low = min(min(r["iter_ms"]) for r in rs)
        ax.set_ylim(low - 0.05 * (top - low), top)
        none_median = next((r["iter_ms_median"] for r in rs if _variant(r) == "none"), None)
        if none_median:
            ax.axhline(none_median, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(1, len(rs) + 1), [_variant(r) for r in rs], fontsize=7, rotation=20)
        ax.set_title(f"{model}, {gpus} GPU{'s' if gpus != 1 else ''} ({card}){chr(10) + run if run else ''}", fontsize=9)
        ax.set_ylabel("iteration ms")
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.suptitle("Engine ablation: iteration times per variant (box: quartiles, whiskers: p10–p90; "
                 "dashed: median of none; ↑: iterations above the axis)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plots(rows: list[dict], outdir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    made = ["ablation.png"] if ablation_plot(rows, outdir / "ablation.png", plt) else []
    rows = [r for r in rows if not is_ablation(r)]  # the plots below compare matrix runs
    every1 = [r for r in rows if r.get("status") == "ok" and r.get("every_n_steps") == 1 and r.get("overhead") is not None
              and r["method"] not in ("none", "none-deepspeed") and r.get("gpus") == 1]
    if every1:
        models = sorted({r["model"] for r in every1})
        methods = sorted({r["method"] for r in every1})
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) * max(1, len(methods)) / 3), 4))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ys = [next((r["overhead"] for r in every1 if r["model"] == mo and r["method"] == m), float("nan")) for mo in models]
            ax.bar([x + i * width for x in range(len(models))], ys, width, label=m)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.05, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(models))], models)
        ax.set_ylabel("iteration time / no checkpointing")
        ax.set_yscale("log")
        ax.set_title("Overhead of a checkpoint every iteration (1 GPU)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(outdir / "overhead.png", dpi=120)
        plt.close(fig)
        made.append("overhead.png")
    rec = [r for r in rows if r.get("status") == "ok" and (r.get("recovery_s_memory") or r.get("recovery_s_disk"))]
    if rec:
        labels = [f"{r['model']}\n{r['method']}" for r in rec]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rec)), 4))
        xs = range(len(rec))
        ax.bar([x - 0.27 for x in xs], [r.get("start_s") or 0 for r in rec], 0.27, label="fresh start")
        ax.bar(list(xs), [r.get("recovery_s_memory") or 0 for r in rec], 0.27, label="from memory")
        ax.bar([x + 0.27 for x in xs], [r.get("recovery_s_disk") or 0 for r in rec], 0.27, label="from disk")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("seconds, process start to end of first step")
        ax.set_title("Recovery time")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(outdir / "recovery.png", dpi=120)
        plt.close(fig)
        made.append("recovery.png")
    return made


SUMMARY_MODELS = ("gpt2-124m", "gpt2-355m", "bert-large-qa", "vit-b16", "resnet50")
SUMMARY_METHODS = (("oteacheck", "OTeaCheck"), ("torchsnapshot", "torchsnapshot"), ("dcp-async", "DCP async"),
                   ("checkfreq", "CheckFreq"), ("lightning-async", "Lightning async"),
                   ("sync-deepspeed", "sync DeepSpeed"), ("sync-torch-save", "sync `torch.save`"))


def _short_card(card: str | None) -> str:
    for name in ("H100", "H200", "A100"):
        if card and name in card:
            return name
    return card or "?"


def _where(r: dict) -> str:
    """Which card and matrix run a table cell's number comes from."""
    return f"{_short_card(r.get('card'))}, `{r.get('tag')}`"


def _methods_header(first: list[str]) -> list[str]:
    """The header rows of a table with ``first`` columns and then one column per method."""
    columns = first + [label for _, label in SUMMARY_METHODS]
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _tag_order(tag: str | None) -> int:
    """Matrix tags carry the session's run counter at their end (``gpu-models12``); none is the earliest."""
    digits = re.search(r"(\d+)$", tag or "")
    return int(digits.group(1)) if digits else 0


# a run's baseline iterations whose p10-p90 width is at most this share of their median: a steady host (a quiet
# H100 host measures 0.2-8%; hosts shared with other work 15-45%, where a 2% difference is not resolved)
STEADY_SPREAD = 0.10


def _baseline_spreads(rows: list[dict]) -> dict[tuple[str, str], float]:
    """Per (model, ablation run): the p10-p90 width of its ``none`` variant's iterations over their median."""
    spreads = {(r["model"], r.get("run")): _spread_of(r) for r in rows if is_ablation(r) and r.get("variant") == "none"}
    return {key: spread[2] for key, spread in spreads.items() if spread is not None and spread[2] is not None}


def _noisy(spread: float | None) -> str:
    return f" (noisy host: baseline p10–p90 {spread:.0%})" if spread is not None and spread > STEADY_SPREAD else ""


def _engine_cell(chosen: dict, latest: dict, card: str, spread: dict[tuple[str, str], float]) -> str:
    """The chosen ablation run of a model on a card; a newer run on a noisy host is named too (newer code may have
    changed the cost, which only that run measured)."""
    cell = f"{_overhead_cell(chosen)} {card}{_noisy(spread.get((chosen['model'], chosen.get('run'))))}"
    if latest is chosen:
        return cell
    noise = spread.get((latest["model"], latest.get("run")))
    how = f", baseline p10–p90 {noise:.0%}" if noise is not None else ""
    return f"{cell} (newer on a noisy host: {_overhead_cell(latest)}{how})"


def summary_section(rows: list[dict]) -> list[str]:
    """One table to choose by: per model, each method's newest measured cost of a checkpoint every iteration on one
    GPU, and the engine's newest paired ablation per kind of card."""
    measured = [r for r in rows if r.get("status", "ok") == "ok" and r.get("gpus") == 1 and r.get("every_n_steps") == 1
                and r.get("every_n_steps_requested", 1) == 1 and r.get("overhead") is not None]
    engine: dict[tuple[str, str], dict] = {}
    latest: dict[tuple[str, str], dict] = {}  # the newest run, steady or not
    spread = _baseline_spreads(rows)
    for r in measured:
        if is_ablation(r) and r.get("variant") == "bubbles":
            key = (r["model"], _short_card(r.get("card")))
            # the newest run on a steady host; on none, the newest run (its cell says how noisy)
            rank = (spread.get((r["model"], r.get("run")), 1.0) <= STEADY_SPREAD, r.get("run", ""))
            if key not in engine or rank > engine[key][0]:
                engine[key] = (rank, r)
            if key not in latest or r.get("run", "") > latest[key].get("run", ""):
                latest[key] = r
    engine = {key: r for key, (_, r) in engine.items()}
    newest: dict[tuple[str, str], dict] = {}
    for r in measured:
        if not is_ablation(r):
            key = (r["model"], r["method"])
            if key not in newest or _tag_order(r.get("tag")) > _tag_order(newest[key].get("tag")):
                newest[key] = r
    models = [m for m in SUMMARY_MODELS if any(k[0] == m for k in (*engine, *newest))]
    if not models:
        return []
    parts = ["## At a glance: a checkpoint every iteration, one GPU", "",
             "Iteration time with a checkpoint every iteration over the same loop without checkpoints. **Engine**: "
             "OTeaCheck's paired ablation (`bubbles` against `none` in one process, 95% interval), per kind of card "
             f"the newest run on a steady host (baseline iterations' p10–p90 within {STEADY_SPREAD:.0%} of their "
             "median), or the newest run where none was steady; the other columns: the newest matrix run of each method (each against the baseline of "
             "its own strategy, in separate processes, which drift by several percent; OTeaCheck's newer matrix "
             "rows are paired in their own run, with a 95% interval), with its card and tag. A dash: not measured. "
             "Every run is in the sections below.", "", *_methods_header(["model", "engine"])]
    for model in models:
        cells = ["; ".join(_engine_cell(r, latest[(m, card)], card, spread)
                           for (m, card), r in sorted(engine.items()) if m == model) or "–"]
        for method, _ in SUMMARY_METHODS:
            r = newest.get((model, method))
            if r is None:
                cells.append("–")
                continue
            ci = r.get("overhead_ci95") if r.get("overhead_paired") is not None else None
            how = f" [{ci[0]:.3f}, {ci[1]:.3f}] paired" if ci else (", separate processes" if method == "oteacheck" else "")
            cells.append(f"{r['overhead']:.3g}x{how} ({_where(r)})")
        parts.append(f"| {model} | " + " | ".join(cells) + " |")
    return parts + [""] + interval_section(rows, newest, engine, models)


def _costs(r: dict) -> str:
    """A run at an interval: its cost against its own quiet iterations, and against the baseline's process."""
    if r.get("overhead_in_run") is None:
        return f"{r['overhead']:.3f}x"
    return f"{r['overhead_in_run']:.3f}x in its run, {r['overhead']:.3f}x against the baseline's process"


def _interval_cell(model: str, method: str, rows: list[dict], newest_every: dict | None) -> str:
    """A method's shortest interval within the 5% budget: measured where a run at a longer interval stayed within
    it, 1 where the every-iteration run did, else estimated from the every-iteration run's cost per checkpoint. A
    run at a longer interval that went over the budget shows the interval is longer still: ``> n``."""
    from .matrix import BUDGET, checkpoint_cost_ms, decisive_overhead, interval_within_budget

    spaced = [r for r in rows if r["model"] == model and r["method"] == method and r.get("status") == "ok"
              and r.get("gpus") == 1 and (r.get("every_n_steps") or 1) > 1 and decisive_overhead(r) is not None]
    within = [r for r in spaced if decisive_overhead(r) <= 1 + BUDGET]
    if within:
        best = min(within, key=lambda r: r["every_n_steps"])
        return f"{best['every_n_steps']} ({_costs(best)}; {_where(best)})"
    over = max(spaced, key=lambda r: r["every_n_steps"], default=None)
    over_at = f"{_costs(over)} at {over['every_n_steps']}" if over is not None else ""
    estimate = None
    r = newest_every
    if r is not None:
        if r["overhead"] <= 1 + BUDGET:
            return f"1 ({_where(r)})"
        base = r.get("baseline_iter_ms_mean") or r.get("baseline_iter_ms_median")
        if base and (r.get("cost_ms_per_checkpoint") is not None or r.get("iter_ms_mean") is not None):
            estimate = interval_within_budget(checkpoint_cost_ms(r, base), base)
    if over is not None and (estimate is None or estimate <= over["every_n_steps"]):
        return f"> {over['every_n_steps']} ({over_at}; {_where(over)})"  # longer
    if estimate is None:
        return "–"
    assert r is not None
    measured = f"; {over_at} ({_where(over)})" if over is not None else ""
    return f"~{estimate} estimated ({_where(r)}){measured}"


def _engine_interval_cell(model: str, engine: dict[tuple[str, str], dict]) -> str | None:
    """OTeaCheck's interval from its paired ablations, per kind of card (the matrix's separate processes drift by
    more than the cost)."""
    from .matrix import BUDGET, interval_within_budget

    cells = []
    for (m, card), r in sorted(engine.items()):
        if m != model:
            continue
        ratio = r["overhead"]
        estimate = f"~{interval_within_budget(ratio - 1, 1.0)} estimated"  # the cost in iterations per snapshot
        cells.append(f"1 ({card})" if ratio <= 1 + BUDGET else f"{estimate} ({card})")
    return "; ".join(cells) or None


def interval_section(rows: list[dict], newest: dict[tuple[str, str], dict], engine: dict[tuple[str, str], dict],
                     models: list[str]) -> list[str]:
    parts = ["### The shortest interval within 5%", "",
             "Steps between checkpoints at which each method costs at most 5% (CheckFreq's budget). A plain number was "
             "measured at that interval (or at every iteration), with its cost; the search starts at the estimate and "
             "adjusts it once, so a shorter interval may hold the budget too. `~n estimated` spreads the every-iteration "
             "run's measured cost per checkpoint over n iterations of its baseline, without a run at that interval; "
             "`> n`: a run at n cost more than 5%, so the shortest interval is longer. A run at an interval is "
             "measured against its own iterations away from the checkpoints (those neither taking one nor within its "
             "slowest durable write and 10 iterations after it; `benchmarks/in_run.py`), which share its process and "
             "GPU clocks: the baseline ran in another process, and separately started processes differed by up to "
             "12% in their median iteration (both numbers are shown). "
             "OTeaCheck's comes from the engine's paired ablation of each kind of card.", "", *_methods_header(["model"])]
    for model in models:
        cells = [_interval_cell(model, method, rows, newest.get((model, method))) for method, _ in SUMMARY_METHODS]
        from_engine = _engine_interval_cell(model, engine)
        if from_engine:
            matrix_row = newest.get((model, "oteacheck"))
            # a paired matrix row on a kind of card the ablations did not run on adds its own interval
            paired_elsewhere = (matrix_row is not None and matrix_row.get("overhead_paired") is not None
                                and (model, _short_card(matrix_row.get("card"))) not in engine)
            i = [m for m, _ in SUMMARY_METHODS].index("oteacheck")
            cells[i] = from_engine + (f"; {cells[i]}" if paired_elsewhere else "")
        parts.append(f"| {model} | " + " | ".join(cells) + " |")
    return parts + [""]


def render(rows: list[dict], images: list[str], results_rel: str, images_rel: str = "benchmarks",
           profiles: dict[tuple, dict] | None = None, contention: list[dict] | None = None) -> str:
    parts = ["# Benchmarks", ""]
    measured = [r for r in rows if r.get("status") == "ok"]
    if not measured:
        parts += ["**No measured numbers yet.** The harness is in `benchmarks/`; the GPU run that produces the numbers "
                  "has not happened (numbers from the CPU smoke runs are never reported here: tiny models on two CPU "
                  "cores say nothing about GPU checkpointing).", "", HOW_TO, METHODS_TEXT]
        return "\n".join(parts)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    # a run that failed before it saw its GPU has no card: it belongs with the other runs of its matrix
    card_of_tag = {r.get("tag"): r["card"] for r in rows if r.get("card") and not is_ablation(r)}
    for r in rows:
        if not is_ablation(r):
            groups[(r.get("card") or card_of_tag.get(r.get("tag")) or "?", r.get("tag") or "?")].append(r)
    ablation_measured = [r for r in measured if is_ablation(r)]
    counted = f"{len(measured)} runs"
    if ablation_measured:
        counted = (f"{len(measured) - len(ablation_measured)} matrix runs and {len(ablation_measured)} variants of "
                   f"{len(ablation_runs(ablation_measured))} engine ablation runs")
    parts += [f"Measured results: {counted}, JSON files in `{results_rel}`. Only the rows below exist; anything not "
              "listed was not measured. `ovh.` is against no checkpointing on the same strategy in the same matrix "
              "run.", ""]
    parts += summary_section(rows)
    for image in images:
        parts += [f"![{image}]({images_rel}/{image})", ""]
    parts += ablation_section(rows, profiles)
    parts += contention_section(contention or [])
    for (card, tag), rs in sorted(groups.items()):
        conditions = sorted({r["run_conditions"] for r in rs if r.get("run_conditions")})
        parts += [f"## {card}, matrix `{tag}`", "", *(f"Conditions: {c}\n" for c in conditions), _versions_line(rs),
                  "", table(rs), "", "<details><summary>commands</summary>", "", "```"]
        parts += sorted({r.get("command") or "" for r in rs if r.get("command")})
        parts += ["```", "", "</details>", ""]
        notes = sorted({f"`{r['method']}` ({r['model']}): {n}" for r in rs for n in r.get("notes") or []})
        if notes:
            parts += ["Notes:", ""] + [f"* {n}" for n in notes] + [""]
    parts += [METHODS_TEXT, HOW_TO]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", default=[str(ROOT / "docs" / "benchmarks" / "results")])
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--plots", default=str(ROOT / "docs" / "benchmarks"))
    p.add_argument("--include-smoke", action="store_true", help="for checking the report only; never commit the output")
    args = p.parse_args(argv)
    rows = load([Path(d) for d in args.results], args.include_smoke)
    images = plots(rows, Path(args.plots)) if rows else []
    md = Path(args.markdown)
    try:
        results_rel = str(Path(args.results[0]).resolve().relative_to(md.parent.resolve().parent))
    except ValueError:
        results_rel = args.results[0]
    try:
        images_rel = str(Path(args.plots).resolve().relative_to(md.parent.resolve()))
    except ValueError:
        images_rel = str(Path(args.plots).resolve())
    md.parent.mkdir(parents=True, exist_ok=True)
    profiles = load_profiles([Path(d) for d in args.results])
    contention = load_contention([Path(d) for d in args.results])
    md.write_text(render(rows, images, results_rel, images_rel, profiles, contention))
    print(f"wrote {md} ({len(rows)} results) and {len(images)} plots")


if __name__ == "__main__":
    main()
