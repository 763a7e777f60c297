"""Before GRPO: how much worse the SFT model's samples are than its greedy answers, and the GRPO setting that suits
the gap. GRPO learns only from samples at the rollout temperature. Where those are far worse than greedy answers
(the tiny SFT model: mean reward 0.13-0.26 at temperature 1 against 59-63% greedy), the policy gradient mostly sees
malformed samples; the tiny recipe then needed the final norm's gain trained (it sets the logits' scale, which LoRA
cannot change) and a KL to the SFT policy to keep greedy answers (docs/tiny_study.md).

    python sampling_gap.py --model_name_or_path outputs/pipeline/base --adapter outputs/pipeline/sft \
        --dataset tiny:gsm8k_train --num_steps 8 --output_dir outputs/sampling-gap-tiny            # CPU, ~1 minute
    python sampling_gap.py --model_name_or_path tomg-group-umd/huginn-0125 --adapter outputs/sft-huginn-80gb \
        --dataset gsm8k --split train --limit 300 --num_steps 32 --output_dir outputs/sampling-gap  # one GPU

It runs evaluate.py on a seeded subset of a train split: greedy, then `num_samples` samples per problem at each of
`temperatures` (top_p 1 and one shared KV slot, as GRPO's rollouts), all at the rollout depth, and prints each
temperature's sampled accuracy as a fraction of the greedy accuracy with the setting it recommends (also in
gap.json).
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import data
import evaluate

# Sampled / greedy accuracy at or above which samples are good enough to learn from as they are. The tiny SFT model
# (0.22-0.43 at temperature 1) needed the gain and the KL; this threshold is a judgement, not a measurement.
GOOD_RATIO = 0.8


def write_subset(dataset: str, split: str | None, limit: int, seed: int, path: Path) -> Path:
    """A seeded random subset of `limit` rows of a split, in its own schema, as a local JSONL file."""
    source = data.resolve_source(evaluate.BENCHMARKS.get(dataset, dataset))
    rows, _ = data.load_source(source, split or data.SFT_SPLITS.get(source))
    chosen = evaluate.fixed_subset(list(range(len(rows))), limit, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for index in chosen:
            file.write(json.dumps(rows[index]) + "\n")
    return path


def accuracy(cells: list[dict]) -> float:
    return sum(cell["accuracy"] * cell["n"] for cell in cells) / sum(cell["n"] for cell in cells)


def recommendation(greedy: float, sampled: dict[float, float]) -> str:
    """The GRPO setting for the measured gap: the highest temperature whose samples keep GOOD_RATIO of the greedy
    accuracy, else the tiny recipe's sharpening (final norm's gain and a KL)."""
    good = [t for t, value in sorted(sampled.items(), reverse=True) if greedy > 0 and value / greedy >= GOOD_RATIO]
    if good and good[0] == max(sampled):
        return (f"small gap: keep temperature {good[0]:g}, final_norm_learning_rate 0 (off) and beta 0 "
                "(DAPO and Dr. GRPO drop the KL term)")
    if good:
        return f"moderate gap: roll out at temperature {good[0]:g}; final_norm_learning_rate 0, beta 0"
    return ("large gap, as in the tiny study: train the final norm's gain (final_norm_learning_rate, e.g. 3e-2 as "
            "the tiny recipe) with a KL to the SFT policy (beta 0.1) to keep greedy answers")


def main(args: argparse.Namespace) -> dict:
    output_dir = Path(args.output_dir)
    problems = write_subset(args.dataset, args.split, args.limit, args.seed, output_dir / "problems.jsonl")
    common = evaluate.EvalArguments(
        model_name_or_path=args.model_name_or_path, adapters=[f"sft={args.adapter}"], benchmarks=[str(problems)],
        num_steps=[args.num_steps], max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt,
        batch_size=args.batch_size, kv_cache_slots=args.kv_cache_slots or None,
        load_in_4bit=args.load_in_4bit, seed=args.seed, output_dir=str(output_dir / "greedy"))
    greedy = accuracy(evaluate.main(common))
    sampled = {}
    for temperature in args.temperatures:
        sampled_args = replace(common, do_sample=True, num_samples=args.num_samples, temperature=temperature,
                               top_p=1.0, output_dir=str(output_dir / f"sampled-t{temperature:g}"))
        sampled[temperature] = accuracy(evaluate.main(sampled_args))
    result = {"greedy_accuracy": greedy, "sampled_accuracy": sampled,
              "ratio": {t: value / greedy if greedy else None for t, value in sampled.items()},
              "recommendation": recommendation(greedy, sampled), "num_steps": args.num_steps,
              "problems": args.limit, "num_samples": args.num_samples}
    (output_dir / "gap.json").write_text(json.dumps(result, indent=2))
    print(f"greedy {100 * greedy:.1f}%; sampled " + ", ".join(
        f"{100 * value:.1f}% at temperature {t:g} ({value / greedy if greedy else 0:.2f} of greedy)"
        for t, value in sampled.items()) + f"\nrecommended: {result['recommendation']}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--adapter", required=True, help="the SFT adapter directory")
    parser.add_argument("--dataset", default="gsm8k", help="GRPO's prompt source: gsm8k, a hub id or a local file")
    parser.add_argument("--split", default=None, help="default: the train split")
    parser.add_argument("--limit", type=int, default=300, help="problems; 300: about +-5 points on an accuracy")
    parser.add_argument("--num_steps", type=int, required=True, help="the rollout depth")
    parser.add_argument("--num_samples", type=int, default=4, help="samples per problem and temperature")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=256, help="at most; the memory plan lowers it to fit")
    parser.add_argument("--kv_cache_slots", type=int, default=1,
                        help="1 (shared), as the full-size GRPO configs' rollouts; 0: exact, one slot per step")
    parser.add_argument("--system_prompt", default=data.SYSTEM_PROMPT, help="as in SFT and GRPO; '' for none")
    parser.add_argument("--load_in_4bit", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
