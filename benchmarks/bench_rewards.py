"""Throughput of the rewards.py grader, in completions graded per second.

    python benchmarks/bench_rewards.py
    python benchmarks/bench_rewards.py --num_workers 2 --repeats 3

Workloads: GSM8K test gold solutions against their gold answers, MATH-500 gold solutions
against theirs, and MATH-500 solutions against the gold of another problem (mismatches:
most go to the math-verify workers, the slow path; later repeats profit from the
workers' parse caches, so the first figure is the honest one). Reads
../shared/benchmarks/{gsm8k,math500}_test.jsonl next to the repo; generates look-alike
data when those files are absent. Worker start-up is excluded (the pool is warmed first).
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewards  # noqa: E402

DEFAULT_BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def gsm8k_workload(benchmarks: Path = DEFAULT_BENCHMARKS) -> tuple[list[str], list[str]]:
    """GSM8K gold solutions and gold answers (generated GSM8K-style ones if the file is absent)."""
    path = benchmarks / "gsm8k_test.jsonl"
    if path.exists():
        rows = read_jsonl(path)
        return [row["answer"] for row in rows], [rewards.gold_answer(row) for row in rows]
    rng = random.Random(0)
    solutions, golds = [], []
    for _ in range(1319):
        a, b = rng.randint(1, 5000), rng.randint(1, 5000)
        solutions.append(f"She buys {a} and then {b} more: {a}+{b}=<<{a}+{b}={a + b}>>{a + b}.\n#### {a + b:,}")
        golds.append(str(a + b))
    return solutions, golds


def math_workload(benchmarks: Path = DEFAULT_BENCHMARKS) -> tuple[list[str], list[str]]:
    """MATH-500 gold solutions and answers (generated MATH-style ones if the file is absent)."""
    path = benchmarks / "math500_test.jsonl"
    if path.exists():
        rows = read_jsonl(path)
        return [row["solution"] for row in rows], [rewards.gold_answer(row) for row in rows]
    rng = random.Random(0)
    forms = [  # (gold, how a solution writes it)
        lambda a, b: (f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a}}}{{{b}}}"),
        lambda a, b: (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"),
        lambda a, b: (f"x^2 + {a}x + {b}", f"x^2+{a}x+{b}"),
        lambda a, b: (f"({a}, {b})", f"\\left( {a}, {b} \\right)"),
        lambda a, b: (f"{a + b}", f"{a + b}"),
    ]
    solutions, golds = [], []
    for k in range(500):
        gold, written = forms[k % len(forms)](rng.randint(1, 30), rng.randint(2, 30))
        solutions.append(f"Working through the algebra we get $\\boxed{{{written}}}$.")
        golds.append(gold)
    return solutions, golds


def mismatched(solutions: list[str], golds: list[str]) -> tuple[list[str], list[str]]:
    """Each solution against the gold of another problem: wrong answers, the expensive case."""
    return solutions[1:] + solutions[:1], golds


def warm_up(num_workers: int | None = None) -> float:
    """Start every worker before timing; returns the start-up time (a one-off cost)."""
    count = num_workers or rewards.default_num_workers()
    pairs = [(f"\\boxed{{\\sqrt{{{2 * k * k}}}}}", f"{k}\\sqrt{{2}}") for k in range(2, 2 + count)]
    start = time.perf_counter()
    rewards.grade_batch([p for p, _ in pairs], [g for _, g in pairs], num_workers=num_workers)
    return time.perf_counter() - start


def throughput(
    solutions: list[str], golds: list[str], numeric_fallback: bool = False, num_workers: int | None = None
) -> float:
    """Completions graded per second by one grade_batch call (call warm_up first)."""
    start = time.perf_counter()
    rewards.grade_batch(solutions, golds, numeric_fallback=numeric_fallback, num_workers=num_workers)
    return len(solutions) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", type=Path, default=DEFAULT_BENCHMARKS)
    parser.add_argument("--num_workers", type=int, default=None, help="default: CPUs available")
    parser.add_argument("--repeats", type=int, default=3, help="runs per workload; prints the worst and best")
    args = parser.parse_args()

    workloads = {
        "GSM8K gold solutions": (*gsm8k_workload(args.benchmarks), True),
        "MATH-500 gold solutions": (*math_workload(args.benchmarks), False),
        "MATH-500 mismatched (slow path)": (*mismatched(*math_workload(args.benchmarks)), False),
    }
    workers = args.num_workers or rewards.default_num_workers()
    print(f"worker start-up: {warm_up(args.num_workers):.1f} s for {workers} workers (excluded below)")
    print(f"{'workload':34s} {'n':>6s} {'worker jobs':>12s} {'completions/s':>14s}")
    for name, (solutions, golds, numeric_fallback) in workloads.items():
        jobs_before = rewards.GRADER_STATS["worker_jobs"]
        rates = [throughput(solutions, golds, numeric_fallback, args.num_workers) for _ in range(args.repeats)]
        jobs = (rewards.GRADER_STATS["worker_jobs"] - jobs_before) // args.repeats
        print(f"{name:34s} {len(solutions):6d} {jobs:12d} {min(rates):8.1f} - {max(rates):.1f}")
    rewards.shutdown_pool()


if __name__ == "__main__":
    main()
