"""How much depth credit changes GRPO's gradient, on one rollout round of a finished tiny pipeline run: the norm of
the extra gradient the earlier read-outs add, relative to plain GRPO's, and its cosine with it, per module group.
Adam is blind to a gradient's scale, so an extra gradient parallel to plain GRPO's changes the update little.

    python pipeline.py --output_dir outputs/pipeline
    python benchmarks/depth_credit_gradient.py --pipeline_dir outputs/pipeline --prompts 16
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_grpo  # noqa: E402
from training import parse_args  # noqa: E402

GROUPS = ("prelude", "adapter", "core_block", "coda", "ln_f")  # the LoRA'd blocks, the recurrence's input mixing


def gradients(trainer, inputs: dict, depth_credit: dict[float, float]) -> dict[str, torch.Tensor]:
    trainer.depth_credit = depth_credit
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, dict(inputs)).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", required=True, help="a pipeline.py output dir: its GRPO config and adapter")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the round (x num_generations samples)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.333, 0.333, 0.333])
    parser.add_argument("--backprop_steps", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    run = Path(args.pipeline_dir)
    trainer = train_grpo.build_trainer(*parse_args(train_grpo.ScriptArguments, train_grpo.GRPOConfig, [
        "--config", str(run / "grpo" / "config.yaml"), "--output_dir", str(run / "depth-credit-gradient"),
        "--backprop_steps", str(args.backprop_steps), "--report_to", "none"]))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    rows = [trainer.train_dataset[i] for i in range(args.prompts) for _ in range(trainer.num_generations)]
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(rows)  # the SFT policy's first round, as in training
    plain = gradients(trainer, inputs, {})
    credited = gradients(trainer, inputs, dict(zip(args.fractions, args.weights, strict=True)))
    result = {}
    print(f"{run}: extra gradient of depth credit {dict(zip(args.fractions, args.weights, strict=True))}, "
          f"backprop {args.backprop_steps} steps; advantages nonzero for "
          f"{100 * (inputs['advantages'] != 0).float().mean():.0f}% of the samples")
    for group in GROUPS:
        names = [name for name in plain if f".{group}." in name]
        if not names:
            continue
        base = torch.cat([plain[name].flatten() for name in names])
        extra = torch.cat([(credited[name] - plain[name]).flatten() for name in names])
        ratio = (extra.norm() / base.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(base, extra, 0).item()
        result[group] = (ratio, cosine)
        print(f"  {group:10s} |extra| / |plain| {ratio:5.2f}   cosine {cosine:+.2f}")
    return result


if __name__ == "__main__":
    main()
