"""GRPO variants of the tiny pipeline compared over seeds: the GRPO checkpoint's greedy accuracy by depth, its mean
reward at temperature 1, adaptive exit (accuracy, mean steps used) and the training reward's rise, per run, as a
mean per variant, and as the difference from a baseline variant seed by seed (the same base and SFT adapter).

    python pipeline.py --output_dir outputs/variants/plain-seed0 --seed 0
    python pipeline.py --output_dir outputs/variants/depth_credit-seed0 --seed 0 --grpo_variant depth_credit
    python benchmarks/grpo_variants.py outputs/variants/*-seed* --baseline plain --plot outputs/variants/curves.png

A run's variant is its folder name before "-seed" (variants joined by "+": depth_credit+lora_only).
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

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


def plot_training_reward(run_dirs: list[Path], path: Path) -> None:
    """GRPO's training reward per step, the mean over each variant's seeds (a 5-step running mean)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = defaultdict(list)
    for run_dir in run_dirs:
        history = json.loads((run_dir / "grpo" / "trainer_state.json").read_text())["log_history"]
        curves[variant_of(run_dir)].append([entry["reward"] for entry in history if "reward" in entry])
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, runs in sorted(curves.items()):
        mean = [sum(values) / len(values) for values in zip(*runs, strict=False)]
        smooth = [sum(mean[max(0, i - 4):i + 1]) / len(mean[max(0, i - 4):i + 1]) for i in range(len(mean))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=f"{variant} ({len(runs)} seeds)")
    ax.set(title="GRPO training reward (mean over seeds, 5-step running mean)", xlabel="step", ylabel="reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished pipeline.py runs named <variant>-seed<N>")
    parser.add_argument("--baseline", default="plain", help="the variant the others are compared with, seed by seed")
    parser.add_argument("--plot", type=Path, help="where to draw the training-reward curves (png)")
    args = parser.parse_args(argv)
    text = compare(args.run_dirs, args.baseline)
    if args.plot:
        plot_training_reward(args.run_dirs, args.plot)
    print(text)
    return text


if __name__ == "__main__":
    main()
