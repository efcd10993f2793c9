"""A matrix of benchmark runs, each in its own process (a clean GPU), within a time budget.

    python -m benchmarks.matrix --models gpt2-124m,gpt2-355m \\
        --methods none,oteacheck-naive,oteacheck-eager,oteacheck --out DIR --budget-s 540

Runs are ordered by priority: models in the order given; for each model, the no-checkpointing baselines its
methods need first (``none`` for the OTeaCheck rows, ``none-deepspeed`` for the others), then the methods in the
order given. Before each run the matrix estimates its duration from the runs so far; a run that no longer fits the
budget is skipped and listed as skipped (nothing is cut off half-way, except by ``--timeout``).

After the runs, every result of this matrix (same ``--tag``; several invocations may share a tag and an ``--out``,
and then reuse each other's results, baselines included) gets its ratios to the baseline of the same model and GPU
count: ``overhead`` (mean iteration time: the throughput cost, which also counts the iterations between two
checkpoints), ``overhead_median`` (median iteration time), ``extra_gpu_mib`` (peak allocated delta). OTeaCheck's
rows at a snapshot every iteration are paired within their own run instead (``--paired-block``, see
``benchmarks.run``): separate processes drift by more than their cost; the ratio to the baseline's process stays as
``overhead_separate``.

``--search-5pct`` then looks, per method, for the shortest interval whose overhead stays at or under 5%: from the
every-iteration run's cost per checkpoint it computes the interval that should fit, runs it (long enough to hold
three checkpoints) and adjusts it once by what that run measured: wider if it went over the budget, narrower if
it stayed well under. When even that run does not fit the budget, the result is an estimate, marked ``"status":
"estimated"`` and never shown as a measurement. CheckFreq chooses its own interval within the budget
(``--every-n-steps 0``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .catalog import BASELINES, METHODS, MODELS, OTEACHECK_METHODS, baseline_of
from .catalog import SMOKE as SMOKE_MODELS
from .in_run import in_run_of
from .run import ROOT, result_name

BUDGET = 0.05
NARROW_BELOW = 0.8  # a run within the budget that used less of it than this is tried once at a shorter interval
# seconds a run takes before its first iteration (model, DeepSpeed, warm-up) on a GPU host, for the time budget
SETUP_S = 45.0
# a run with recovery also restarts from each tier its method has: about this many times the run alone
RECOVERY_RUN_FACTOR = 2.5


def interval_within_budget(cost_ms: float, base_ms: float) -> int:
    """The shortest checkpoint interval (steps) at which ``cost_ms`` per checkpoint, spread over the interval, adds
    at most ``BUDGET`` to an iteration of ``base_ms``."""
    return max(1, math.ceil(round(cost_ms / (BUDGET * base_ms), 6)))


def decisive_overhead(result: dict[str, Any]) -> float | None:
    """The overhead that decides whether a run held the budget: against its own quiet iterations where it has them
    (a run at an interval, :mod:`.in_run`), else against the baseline (paired within the run for OTeaCheck)."""
    in_run = result.get("overhead_in_run")
    return in_run if in_run is not None else result.get("overhead")


def checkpoint_cost_ms(result: dict[str, Any], base_ms: float) -> float:
    """What one checkpoint cost a run at every iteration: its own measure, else its iteration over ``base_ms``."""
    return result.get("cost_ms_per_checkpoint") or (result["iter_ms_mean"] - base_ms)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="comma-separated")
    p.add_argument("--methods", required=True, help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--gpus", default="1", help="comma-separated GPU counts")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="iterations of the no-checkpointing runs (default --steps): a run at a long interval needs "
                        "many iterations to hold 3 checkpoints, its baseline only enough for a stable mean")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--every-n-steps", default="1", help="comma-separated intervals to run every method at")
    p.add_argument("--persist-every-n-steps", type=int, default=50)
    p.add_argument("--staging-mib", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--recovery", default="", help="comma-separated methods whose restart is measured too ('all')")
    p.add_argument("--paired-block", type=int, default=3,
                   help="OTeaCheck rows at every step: overhead paired within their own run, blocks of this many "
                        "iterations (they run twice --steps, half without snapshots); 0: against the baseline's process")
    p.add_argument("--search-5pct", action="store_true", help="find each method's shortest interval within 5%%")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget for this invocation")
    p.add_argument("--deadline", type=float, default=None, help="absolute end time (epoch seconds), e.g. shared by several invocations")
    p.add_argument("--run-seconds", type=float, default=None, help="per run: stop measuring after this long (>= 5 iterations)")
    p.add_argument("--timeout", type=float, default=600, help="per run: kill after this long")
    p.add_argument("--first-run-estimate", type=float, default=None, help="assumed duration of a run before any finished")
    p.add_argument("--tag", default=None, help="matrix id; results with the same tag share baselines")
    p.add_argument("--no-reuse", action="store_true", help="rerun even if a result of this tag exists")
    p.add_argument("--no-baselines", action="store_true", help="do not add the no-checkpointing runs (e.g. restart-time runs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    return p


class Matrix:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tag = args.tag or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        start = time.time()
        ends = [t for t in (args.deadline, start + args.budget_s if args.budget_s else None) if t]
        self.deadline = min(ends) if ends else None
        self.log = self.out / "matrix-log.jsonl"
        # model, seconds (a recovery run's / RECOVERY_RUN_FACTOR), iterations
        self.durations: list[tuple[str, float, int]] = self._logged_durations()
        self.recovery = set(METHODS) if args.recovery == "all" else {m for m in args.recovery.split(",") if m}

    # --- time budget ----------------------------------------------------------------------------------------

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def estimate(self, model: str, recovery: bool, steps: int) -> float:
        """Seconds a run of ``steps`` iterations will take: a start-up, then the iterations at the rate the runs
        so far had (a 2800-iteration run after a 400-iteration baseline is not the baseline's time again)."""
        same = [(d, n) for m, d, n in self.durations if m == model]
        known = same or [(d, n) for _, d, n in self.durations]
        if known:
            setup = min(SETUP_S, 0.5 * min(d for d, _ in known))
            rates = sorted((d - setup) / max(n, 1) for d, n in known)
            guess = setup + rates[len(rates) // 2] * steps
        else:
            guess = self.args.first_run_estimate or (20.0 if self.args.smoke else 60.0)
        return guess * (RECOVERY_RUN_FACTOR if recovery else 1.0)

    # --- one run -----------------------------------------------------------------------------------------------

    def existing(self, model: str, method: str, gpus: int, every: int) -> dict | None:
        path = self.out / result_name(model, method, gpus, every)
        if self.args.no_reuse or not path.exists():
            return None
        data = json.loads(path.read_text())
        return data if data.get("tag") == self.tag and data.get("status") in ("ok", "estimated") else None

    def run(self, model: str, method: str, gpus: int, every: int, steps: int | None = None) -> dict | None:
        got = self.existing(model, method, gpus, every)
        if got is not None:
            return got
        recovery = method in self.recovery
        paired = bool(self.args.paired_block) and every == 1 and method in OTEACHECK_METHODS and method != "none"
        a = self.args
        if steps is None:
            steps = a.baseline_steps if a.baseline_steps and method in BASELINES else a.steps
        steps *= 2 if paired else 1  # twice the iterations
        need = self.estimate(model, recovery, steps)
        left = self.remaining()
        entry = {"tag": self.tag, "model": model, "method": method, "gpus": gpus, "every_n_steps": every}
        if need > left:
            self._log({**entry, "status": "skipped", "reason": f"time budget: needs about {need:.0f} s, {max(left, 0):.0f} s left"})
            print(f"[matrix] skip {model} {method} x{gpus} n={every}: needs ~{need:.0f}s, {max(left, 0):.0f}s left", flush=True)
            return None
        cmd = [sys.executable, "-m", "benchmarks.run", "--model", model, "--method", method, "--gpus", str(gpus),
               "--steps", str(steps), "--warmup", str(a.warmup), "--every-n-steps", str(every),
               "--persist-every-n-steps", str(a.persist_every_n_steps), "--staging-mib", str(a.staging_mib),
               "--out", str(self.out), "--tag", self.tag, "--timeout", str(max(30.0, min(a.timeout, left - 2)))]
        if a.smoke:
            cmd.append("--smoke")
        if recovery:
            cmd.append("--recovery")
        if paired:
            cmd += ["--paired-block", str(a.paired_block)]
        if a.run_seconds:
            cmd += ["--max-seconds", str(a.run_seconds * (2 if paired else 1))]
        print(f"[matrix] run {model} {method} x{gpus} n={every} ({left:.0f}s left)", flush=True)
        if a.dry_run:
            print("  " + shlex.join(cmd))
            return None
        started = time.time()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        took = time.time() - started
        self.durations.append((model, took / (RECOVERY_RUN_FACTOR if recovery else 1.0), steps))
        path = self.out / result_name(model, method, gpus, every)
        result = json.loads(path.read_text()) if path.exists() else None
        status = result.get("status") if result else f"driver failed ({proc.returncode})"
        self._log({**entry, "status": status, "seconds": round(took, 1), "iterations": steps, "recovery": recovery,
                   "error": (result or {}).get("error") or (proc.stderr[-1500:] if proc.returncode else None)})
        print(f"[matrix]   {status} in {took:.0f}s" + (f": {result.get('error')}" if result and result.get("error") else ""), flush=True)
        return result

    def _logged_durations(self) -> list[tuple[str, float, int]]:
        """The durations of this tag's runs that earlier matrices logged in this folder: a call that runs one matrix
        per spec (``benchmarks/gpu_intervals.sh``) estimates its later runs from them, not from a first-run guess
        (a 60 s guess started a 190 s run with 169 s left, and the call's timeout cut it off)."""
        if not self.log.exists():
            return []
        found = []
        for line in self.log.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a call's timeout
                continue
            if e.get("tag") == self.tag and "seconds" in e and "iterations" in e:
                found.append((e["model"], e["seconds"] / (RECOVERY_RUN_FACTOR if e.get("recovery") else 1.0), e["iterations"]))
        return found

    def _log(self, entry: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    # --- the matrix ------------------------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str, int, int]]:
        a = self.args
        methods = [m for m in a.methods.split(",") if m]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        # checked here, not by each run: an unknown name would cost a process start per run before it said so
        known_models = SMOKE_MODELS if a.smoke else MODELS
        unknown = [m for m in a.models.split(",") if m and m not in known_models]
        if unknown:
            raise SystemExit(f"unknown models {unknown}; choose from {', '.join(known_models)}")
        if a.paired_block and (a.paired_block < 3 or 2 * a.steps < 4 * a.paired_block):
            raise SystemExit(f"--paired-block {a.paired_block} with --steps {a.steps}: a paired run needs blocks of at "
                             f"least 3 iterations and --steps of at least twice the block; or --paired-block 0")
        jobs = []
        for gpus in [int(g) for g in a.gpus.split(",")]:
            for model in [m for m in a.models.split(",") if m]:
                needed = []
                for m in methods:
                    b = baseline_of(m)
                    if b not in needed:
                        needed.append(b)
                for b in needed:
                    if not a.no_baselines or b in methods:
                        jobs.append((model, b, gpus, 1))
                for every in [int(e) for e in a.every_n_steps.split(",")]:
                    for m in methods:
                        if m not in BASELINES:
                            jobs.append((model, m, gpus, every))
        return jobs

    def main(self) -> None:
        gpus_here = _gpu_count()
        for model, method, gpus, every in self.plan():
            if not self.args.smoke and gpus > max(gpus_here, 0) and not self.args.dry_run:
                self._log({"tag": self.tag, "model": model, "method": method, "gpus": gpus, "status": "skipped",
                           "reason": f"{gpus} GPUs asked, {gpus_here} here"})
                continue
            self.run(model, method, gpus, every)
        if self.args.search_5pct and not self.args.dry_run:
            self.fill()
            self.search()
        self.fill()

    # --- ratios --------------------------------------------------------------------------------------------

    def results(self) -> list[tuple[Path, dict]]:
        out = []
        for path in sorted(self.out.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(data, dict) and data.get("tag") == self.tag and "method" in data:
                out.append((path, data))
        return out

    def fill(self) -> None:
        results = self.results()
        base = {(d["model"], d["gpus"], d["method"]): d for _, d in results
                if d.get("status") == "ok" and d["method"] in BASELINES}
        for path, d in results:
            if d.get("status") != "ok":
                continue
            wanted = d.get("baseline_method") or baseline_of(d["method"])
            b = base.get((d["model"], d["gpus"], wanted))
            if b is None:
                other = "none-deepspeed" if wanted == "none" else "none"
                b = base.get((d["model"], d["gpus"], other))
                note = f"compared with {other}: no {wanted} run in this matrix"
                if b is not None and note not in d.setdefault("notes", []):
                    d["notes"].append(note)
            if b is None:
                continue
            d["baseline_iter_ms_median"] = b["iter_ms_median"]
            d["baseline_iter_ms_mean"] = b["iter_ms_mean"]
            d["overhead"] = d["iter_ms_mean"] / b["iter_ms_mean"]
            d["overhead_median"] = d["iter_ms_median"] / b["iter_ms_median"]
            if d.get("overhead_paired") is not None:
                # measured within the run: the ratios to the baseline's process only say how far processes drift
                d["overhead_separate"], d["overhead_median_separate"] = d["overhead"], d["overhead_median"]
                d["overhead"] = d["overhead_median"] = d["overhead_paired"]
            if d.get("peak_gpu_mib") is not None and b.get("peak_gpu_mib") is not None:
                d["extra_gpu_mib"] = d["peak_gpu_mib"] - b["peak_gpu_mib"]
            if d["method"] not in BASELINES and d.get("checkpoints") and d.get("overhead_paired") is None:
                # the time checkpointing added per checkpoint, all effects included (the host stall is only part)
                extra_ms = (d["iter_ms_mean"] - b["iter_ms_mean"]) * d["steps_measured"]
                d["cost_ms_per_checkpoint"] = extra_ms / d["checkpoints"]
            d.update(in_run_of(d) or {})
            path.write_text(json.dumps(d, indent=1, default=str))

    # --- shortest interval within 5% -----------------------------------------------------------------------

    def search(self) -> None:
        for path, d in self.results():
            if d.get("status") != "ok" or d["method"] in BASELINES or d.get("every_n_steps_requested", d["every_n_steps"]) != 1:
                continue
            model, method, gpus = d["model"], d["method"], d["gpus"]
            if method == "checkfreq":
                self.run(model, method, gpus, 0, steps=max(self.args.steps, 40))
                continue
            if d.get("overhead") is None:
                continue
            if d["overhead"] <= 1 + BUDGET:
                d["shortest_interval_within_5pct"] = 1
                path.write_text(json.dumps(d, indent=1, default=str))
                continue
            base_ms = d["baseline_iter_ms_mean"]
            cost = checkpoint_cost_ms(d, base_ms)
            n = max(2, interval_within_budget(cost, base_ms))
            for _ in range(2):
                steps = max(self.args.steps, 3 * n)
                fits = steps * base_ms / 1e3 < 0.5 * max(self.remaining(), 0) and steps <= 600
                if not fits:
                    self._estimate(d, n, cost, base_ms)
                    break
                got = self.run(model, method, gpus, n, steps=steps)
                self.fill()
                got = self.existing(model, method, gpus, n) if got is not None else None
                if got is None or decisive_overhead(got) is None:
                    break
                # once more at the interval this run's own cost per checkpoint gives: wider if it went over the
                # budget; narrower if it used less than NARROW_BELOW of it and its cost was resolved (over 1%: below
                # that, noise between processes decides), since the first guess came from another run
                used = (decisive_overhead(got) - 1) / BUDGET
                if used <= 1 and not (0.2 < used < NARROW_BELOW):
                    break
                adjusted = max(2, math.ceil(round(n * used, 6)))
                if adjusted == n:
                    break
                n = adjusted

    def _estimate(self, d: dict, n: int, cost_ms: float, base_ms: float) -> None:
        est = {k: d.get(k) for k in ("card", "gpus", "model", "method", "baseline_method", "smoke", "versions", "tag",
                                     "stall_ms_median", "durable_s", "state_mib_per_rank", "extra_gpu_mib", "host_rss_mib")}
        est.update(status="estimated", every_n_steps=n, overhead=1 + cost_ms / (n * base_ms), overhead_median=None,
                   iter_ms_median=None, iter_ms_p90=None,
                   checkpoints_per_hour=3600e3 / (n * (base_ms + cost_ms / n)),
                   command=d.get("command"),
                   notes=[f"not measured (a run holding 3 checkpoints at this interval does not fit the time budget): "
                          f"estimated from the every-iteration run's cost of {cost_ms:.1f} ms per checkpoint"])
        path = self.out / result_name(d["model"], d["method"], d["gpus"], n)
        path.write_text(json.dumps(est, indent=1, default=str))
        self._log({"tag": self.tag, "model": d["model"], "method": d["method"], "gpus": d["gpus"], "every_n_steps": n,
                   "status": "estimated"})


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    matrix = Matrix(args)
    print(f"[matrix] tag {matrix.tag}, results in {matrix.out}", flush=True)
    matrix.main()
    summary = [{k: d.get(k) for k in ("model", "method", "gpus", "every_n_steps", "status", "iter_ms_median",
                                      "overhead", "stall_ms_median", "error")} for _, d in matrix.results()]
    (matrix.out / f"matrix-{matrix.tag}.json").write_text(json.dumps({"tag": matrix.tag, "argv": sys.argv[1:] if argv is None else argv,
                                                                       "results": summary}, indent=1))
    for row in summary:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
