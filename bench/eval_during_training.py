"""Training step time while lm-eval scores a checkpoint beside it (`eval.tasks`), against the steps of the same
run when no evaluation runs, and against runs without `eval.tasks` at all.

Each repeat is one `openllama train tiny-cpu` with the local task pack scored every `--every` steps and one
without, alternated, on an in-process Ray of this machine's CPUs (the evaluation takes `eval.tasks_cpus`,
the worker the rest). A step overlaps an evaluation when it finished inside one (from the training run's own
MLflow record: each step's `step_time_s` and time, each evaluation's `eval/seconds` and time). Printed: the
median step time inside and outside evaluations and across the run without, as the median of the repeats
with its spread.

    python bench/eval_during_training.py [--steps 1000] [--every 200] [--limit 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(work: Path, steps: int, every: int, limit: int, tasks: bool) -> Path:
    """One run's MLflow store, after `openllama train tiny-cpu` finished."""
    store = work / "mlruns.db"
    overrides = [f"output_dir={work}/runs", f"data.path={work.parent}/data",
                 f"data.build_from={REPO}/data/sample/redpajama",
                 f"data.tokenizer={work.parent}/data-tokenizer/tokenizer.model", f"train.steps={steps}",
                 "train.log_every=1", f"checkpoint.every_steps={every}", "eval.every_steps=0",
                 f"eval.tasks={'[openllama_local]' if tasks else '[]'}", f"eval.tasks_limit={limit}",
                 f"tracking.uri=sqlite:///{store}", "tracking.system_metrics_every_s=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "openllama.cli", "train", "tiny-cpu", *overrides], check=True, cwd=REPO,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return store


def step_times(store: Path) -> tuple[list[float], list[float]]:
    """(step times inside an evaluation, step times outside), the first 5 steps (compilation) left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("openllama-train").experiment_id])
    steps = [m for m in client.get_metric_history(run.info.run_id, "step_time_s") if m.step > 5]
    windows = [(m.timestamp / 1000 - m.value, m.timestamp / 1000)
               for m in client.get_metric_history(run.info.run_id, "eval/seconds")]
    inside = [m.value for m in steps if any(start <= m.timestamp / 1000 <= end for start, end in windows)]
    outside = [m.value for m in steps if not any(start <= m.timestamp / 1000 <= end for start, end in windows)]
    return inside, outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    inside, outside, without = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for tasks in (True, False):  # alternated
                store = train(Path(scratch) / f"{repeat}-{tasks}", args.steps, args.every, args.limit, tasks)
                during, rest = step_times(store)
                if tasks and not during:
                    raise SystemExit("no step ran while an evaluation did: train longer (--steps)")
                if tasks:
                    inside.append(statistics.median(during))
                    outside.append(statistics.median(rest))
                else:
                    without.append(statistics.median(rest))
                print(f"repeat {repeat} {'with' if tasks else 'without'} eval.tasks: {len(during)} steps during an "
                      f"evaluation, {len(rest)} outside", flush=True)

    def figure(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):.1f} ms (spread {1000 * min(values):.1f}-{1000 * max(values):.1f})"

    print(f"step time, tiny-cpu, {os.cpu_count()} CPUs, median of {args.repeats} runs each:")
    print(f"  while an evaluation runs:        {figure(inside)}")
    print(f"  same runs, no evaluation running: {figure(outside)}")
    print(f"  runs without eval.tasks:          {figure(without)}")
    ratios = [i / o for i, o in zip(inside, outside, strict=True)]
    print(f"  during / outside, same run: {statistics.median(ratios):.2f}x "
          f"(spread {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"  outside / without eval.tasks: {statistics.median(outside) / statistics.median(without):.2f}x")


if __name__ == "__main__":
    main()
