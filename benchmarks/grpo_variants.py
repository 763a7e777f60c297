"""GRPO variants of the tiny pipeline compared over seeds: the GRPO checkpoint's greedy accuracy by depth, its mean
reward at temperature 1, adaptive exit (accuracy, mean steps used) and the training reward's rise, per run, as a
mean per variant, and as the difference from a baseline variant seed by seed (the same base and SFT adapter).

    python pipeline.py --output_dir outputs/variants/plain-seed0 --seed 0
    python pipeline.py --output_dir outputs/variants/depth_credit-seed0 --seed 0 --grpo_variant depth_credit
    python benchmarks/grpo_variants.py outputs/variants/*-seed* --baseline plain

A run's variant is its folder name before "-seed" (variants joined by "+": depth_credit+lora_only).
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402


def measures(run: dict) -> dict[str, float]:
    """A run's GRPO measures, in points (accuracy, reward x 100) and steps."""
    greedy, adaptive = run["greedy"]["grpo"], run["adaptive"]["grpo"]
    row = {f"greedy {n}": 100 * accuracy for n, accuracy in greedy.items()}
    row["mean reward"] = 100 * run["mean_reward"]["grpo"]
    row["adaptive exit"] = 100 * adaptive["accuracy"]
    row["steps used"] = adaptive["mean_steps_used"]
    row["training reward rise"] = 100 * run["effects"]["grpo_training_reward_rise"]
    return row


def variant_of(run_dir: Path) -> str:
    return run_dir.name.rsplit("-seed", 1)[0]


def table(rows: list[tuple[str, dict[str, float]]], first: str) -> list[str]:
    columns = list(rows[0][1])
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, row in rows:
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" if c == "steps used" else f"{row[c]:.1f}"
                                                 for c in columns) + " |")
    return lines


def compare(run_dirs: list[Path], baseline: str) -> str:
    effects = [pipeline.run_effects(d) for d in run_dirs]
    runs = {(variant_of(d), run["seed"]): measures(run) for d, run in zip(run_dirs, effects, strict=True)}
    by_variant = defaultdict(dict)
    for (variant, seed), row in sorted(runs.items()):
        by_variant[variant][seed] = row
    lines = ["Per run:", ""]
    lines += table([(f"{variant}, seed {seed}", row) for (variant, seed), row in sorted(runs.items())], "run")
    lines += ["", "Mean over seeds:", ""]
    lines += table([(f"{variant} (seeds {', '.join(map(str, sorted(seeds)))})",
                     {c: sum(r[c] for r in seeds.values()) / len(seeds) for c in next(iter(seeds.values()))})
                    for variant, seeds in by_variant.items()], "variant")
    if baseline in by_variant:
        lines += ["", f"Minus {baseline} on the same seed: mean [lowest, highest seed]:", ""]
        rows = []
        for variant, seeds in by_variant.items():
            shared = sorted(set(seeds) & set(by_variant[baseline]))
            if variant == baseline or not shared:
                continue
            deltas = {c: [seeds[s][c] - by_variant[baseline][s][c] for s in shared] for c in seeds[shared[0]]}
            rows.append((f"Δ {variant} (seeds {', '.join(map(str, shared))})", deltas))
        columns = list(rows[0][1]) if rows else []
        lines += ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for label, deltas in rows:
            lines.append(f"| {label} | " + " | ".join(
                f"{sum(d) / len(d):+.2f} [{min(d):+.2f}, {max(d):+.2f}]" if c == "steps used" else
                f"{sum(d) / len(d):+.1f} [{min(d):+.1f}, {max(d):+.1f}]" for c, d in deltas.items()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished pipeline.py runs named <variant>-seed<N>")
    parser.add_argument("--baseline", default="plain", help="the variant the others are compared with, seed by seed")
    args = parser.parse_args(argv)
    text = compare(args.run_dirs, args.baseline)
    print(text)
    return text


if __name__ == "__main__":
    main()
