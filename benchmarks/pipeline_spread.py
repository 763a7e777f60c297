"""The tiny pipeline's learning effects over several finished runs (seeds, torch builds): one row per run and each
effect's range, the table behind the README's spread and tests/test_pipeline.py's margins.

    python pipeline.py --output_dir outputs/pipeline-seed1 --seed 1      # one run per seed and environment
    python benchmarks/pipeline_spread.py outputs/pipeline outputs/pipeline-seed1 outputs/pipeline-seed2
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402

COLUMNS = {  # effect -> column heading (points)
    "sft_over_base": "SFT - base, greedy 8",
    "deep_over_shallow": "SFT 8 - 1 steps",
    "grpo_over_sft_reward": "GRPO - SFT, mean reward",
    "grpo_over_sft_greedy": "GRPO - SFT, greedy 8",
    "grpo_training_reward_rise": "GRPO training reward, last 5 - first 5",
}


def table(runs: list[dict]) -> str:
    lines = ["| run | seed | torch | " + " | ".join(COLUMNS.values()) + " | GRPO vs SFT greedy: fixed / broken |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for run in runs:
        values = " | ".join(f"{100 * run['effects'][name]:+.1f}" for name in COLUMNS)
        changes = run["changes"]
        lines.append(f"| {run['run']} | {run['seed']} | {run['torch']} | {values} | "
                     f"{changes['fixed']} / {changes['broken']} of {changes['n']} |")
    ranges = " | ".join(f"{100 * min(r['effects'][name] for r in runs):+.1f} .. "
                        f"{100 * max(r['effects'][name] for r in runs):+.1f}" for name in COLUMNS)
    net = [run["changes"]["fixed"] - run["changes"]["broken"] for run in runs]
    lines.append(f"| range | | | {ranges} | net {min(net):+d} .. {max(net):+d} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="output_dirs of finished pipeline.py runs")
    args = parser.parse_args(argv)
    text = table([pipeline.run_effects(run_dir) for run_dir in args.run_dirs])
    print(text)
    return text


if __name__ == "__main__":
    main()
