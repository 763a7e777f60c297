"""Where the time of one GRPO step goes, on the tiny default (CPU): rollout decode, grading, the sampler-mismatch
scoring forward (when on), the loss forward, its backward, and the trainer's bookkeeping (the rest); and the memory
the loss forward keeps for backward (its saved activations, each storage counted once).

    python pipeline.py --output_dir outputs/pipeline                                   # once: base + SFT adapter
    python benchmarks/bench_grpo_step.py --pipeline_dir outputs/pipeline --steps 8     # its GRPO stage's settings
    python benchmarks/bench_grpo_step.py --steps 4                                      # random tiny model, fresh LoRA
    python benchmarks/bench_grpo_step.py --pipeline_dir outputs/pipeline --steps 8 -- --backprop_steps 8 \
        --depth_credit_fractions 0.125 0.25 0.5 --depth_credit_weights 0.333 0.333 0.333  # depth credit's cost

The first step (warm-up: grading workers start, allocations) is left out of the means. Results: results_grpo_step.md.
"""

import argparse
import functools
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_grpo  # noqa: E402
from training import parse_args  # noqa: E402

PHASES = {  # trainer method -> phase it times (nested calls are subtracted from their callers below)
    "_generate_single_turn": "rollout decode",
    "_calculate_rewards": "grading",
    "compute_loss": "loss forward",
}


def timed(trainer, method: str, seconds: dict) -> None:
    """Wrap trainer.method so each call adds its wall time to seconds[PHASES[method]]."""
    original = getattr(trainer, method)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[PHASES[method]] += time.perf_counter() - start

    setattr(trainer, method, wrapper)


def measure_saved_activations(trainer, saved_bytes: list[int]) -> None:
    """Wrap trainer.compute_loss so each call appends the bytes of the tensors autograd saves for backward (distinct
    storages only: a weight saved by several ops counts once), the loss's activation memory."""
    original = trainer.compute_loss

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = original(*args, **kwargs)
        frozen = sum(p.untyped_storage().nbytes() for p in trainer.model.parameters()
                     if p.untyped_storage().data_ptr() in storages)
        saved_bytes.append(sum(storages.values()) - frozen)  # activations, not the weights they multiply
        return loss

    trainer.compute_loss = wrapper


def build(args):
    overrides = ["--output_dir", str(Path(args.output_dir) / "grpo"), "--max_steps", str(args.steps),
                 "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", *args.overrides]
    if args.pipeline_dir:
        config = Path(args.pipeline_dir) / "grpo" / "config.yaml"
    else:
        config = Path(__file__).resolve().parents[1] / "configs" / "grpo_tiny.yaml"
    return train_grpo.build_trainer(*parse_args(train_grpo.ScriptArguments, train_grpo.GRPOConfig,
                                                ["--config", str(config), *overrides]))


def main(args) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    trainer = build(args)
    steps = []  # per optimizer step: {phase: seconds}
    current = defaultdict(float)
    for method in PHASES:
        timed(trainer, method, current)
    backward = trainer.accelerator.backward

    def timed_backward(loss, **kwargs):
        start = time.perf_counter()
        backward(loss, **kwargs)
        current["loss backward"] += time.perf_counter() - start

    trainer.accelerator.backward = timed_backward
    step_start = [time.perf_counter()]

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            steps.append({**current, "step": now - step_start[0]})
            current.clear()
            step_start[0] = now

    trainer.add_callback(StepTimer())
    saved_bytes = []
    measure_saved_activations(trainer, saved_bytes)
    trainer.train()
    measured = steps[1:] or steps
    mean = {key: sum(s.get(key, 0.0) for s in measured) / len(measured) for key in steps[0]}
    # rollout decode and grading run inside TRL's generation round; the round's other work (its scoring forward when
    # the correction is on, advantages, metrics) and the optimizer step count as bookkeeping
    mean["bookkeeping"] = mean["step"] - sum(mean.get(phase, 0.0) for phase in (*PHASES.values(), "loss backward"))
    print(f"mean of steps 2..{len(steps)} ({os.cpu_count()} cores, {args.threads} threads):")
    for key in (*PHASES.values(), "loss backward", "bookkeeping", "step"):
        print(f"  {key:16s} {mean.get(key, 0.0):6.2f} s")
    mean["saved_activations_mb"] = max(saved_bytes) / 2**20
    print(f"  loss activations saved for backward, largest micro-batch: {mean['saved_activations_mb']:.1f} MB")
    return mean


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", help="a pipeline.py output dir: its base, SFT adapter and GRPO config")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/bench-grpo-step")
    parser.add_argument("overrides", nargs="*", help="GRPO config overrides, e.g. -- --max_completion_length 24")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse())
