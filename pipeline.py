"""One command from nothing to results: the tiny end-to-end pipeline, offline on CPU (about 6 minutes on 2 cores).

    python pipeline.py --output_dir outputs/pipeline
    python pipeline.py --output_dir outputs/pipeline-seed1 --seed 1
    python pipeline.py --output_dir outputs/pipeline --config configs/pipeline_tiny.yaml   # sizes and steps
    python pipeline.py --output_dir outputs/pipeline-depth --grpo_variant depth_credit  # the config's grpo_variants

Stages, each writing one subfolder of output_dir:

    data/    tiny.py's datasets: sums of 2-4 single-digit numbers in OpenMathInstruct-2 (SFT), GSM8K (GRPO prompts,
             eval) and MATH (eval) schemas
    base/    the tiny default model and tokenizer, pretrained full-parameter on plain text
             ("What is 3+4+5?\\n3+4+5=12")
             with the model's own random depth: a base that can add but has never seen the chat format
    sft/     train_sft.py: LoRA (and the input embeddings) on base/, chat format, "3+4+5=12. \\boxed{12}"
    grpo/    train_grpo.py from the SFT adapter, correctness + format rewards
    eval/    evaluate.py compare mode on the GSM8K and MATH files: base, sft and grpo greedy at 1, 2, 4 and 8 recurrent
             steps (eval/eval), with adaptive exit and the mean steps it used (eval/eval_adaptive), and their mean
             correctness reward, sampled as in GRPO's rollouts (eval/eval_sampled)
    report/  results.md (table, learning effects, timings), accuracy_vs_steps.png, training_curves.png
             (pretraining and SFT loss, GRPO reward)

Rerunning with the same output_dir skips a stage whose stage.json records the same settings as now (its own and
all earlier stages'); a changed setting reruns that stage and every later one. After changing code, use a new
output_dir. The YAML config's sections override the stages' tiny configs; this script sets the paths, the seed and
the system prompt of every stage, so SFT, GRPO and evaluation render the same prompts.
"""

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import matplotlib
import torch
import yaml
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup
from trl import GRPOConfig, SFTConfig

import evaluate
import tiny
import train_grpo
import train_sft
import training

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "pipeline_tiny.yaml"
SECTION_CONFIGS = {"sft": "sft_tiny.yaml", "grpo": "grpo_tiny.yaml", "eval": "eval_tiny.yaml",
                   "eval_adaptive": "eval_tiny.yaml", "eval_sampled": "eval_tiny.yaml"}
EVAL_SECTIONS = ("eval", "eval_adaptive", "eval_sampled")
STAGE_FILE = "stage.json"  # written last: a stage folder without it is incomplete
# The settings each stage depends on, earlier stages' included.
STAGE_SETTINGS = {"data": [], "base": ["seed", "pretrain"], "sft": ["seed", "pretrain", "system_prompt", "sft"],
                  "grpo": ["seed", "pretrain", "system_prompt", "sft", "grpo"],
                  "eval": ["seed", "pretrain", "system_prompt", "sft", "grpo", *EVAL_SECTIONS]}


@dataclass
class PretrainArguments:
    max_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 20


# ---------------------------------------------------------------------------------------------------------------
# Pretraining: plain arithmetic text, full parameters, random depth
# ---------------------------------------------------------------------------------------------------------------


def arithmetic_example(tokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """input_ids and labels of "<bos>What is 3+4+5?\\n3+4+5=12<eos>", the loss on the worked line: the base learns to
    restate a question's sum and add it up, in plain text (a third of a chat example's length; learning to add
    takes ~10,000 examples). It never sees the chat format or \\boxed{}: SFT teaches those."""
    problem, expression, total = tiny.sum_problem(rng)
    question = [tokenizer.bos_token_id] + tokenizer.encode(f"{problem}\n", add_special_tokens=False)
    answer = tokenizer.encode(f"{expression}={total}", add_special_tokens=False) + [tokenizer.eos_token_id]
    return question + answer, [-100] * len(question) + answer


def arithmetic_batch(tokenizer, rng: random.Random, batch_size: int) -> dict[str, torch.Tensor]:
    """Right-padded: without an attention mask the causal mask already keeps real tokens from seeing the padding."""
    examples = [arithmetic_example(tokenizer, rng) for _ in range(batch_size)]
    length = max(len(ids) for ids, _ in examples)
    return {"input_ids": torch.tensor([ids + [tokenizer.pad_token_id] * (length - len(ids)) for ids, _ in examples]),
            "labels": torch.tensor([labels + [-100] * (length - len(labels)) for _, labels in examples])}


def pretrain(base_dir: Path, args: PretrainArguments, seed: int) -> None:
    """The tiny default from random weights, trained full-parameter (LoRA on random weights learns little), then
    saved with its tokenizer as a normal model directory: the base that SFT and GRPO adapt. A plain loop, not a
    Trainer: batches are generated on the fly and the stage is short, so there is no dataset, checkpoint or resume
    to manage (an interrupted pipeline reruns this stage)."""
    tiny.build_tiny_default(base_dir, seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model.train()  # num_steps=None: each forward draws its depth from the model's own depth sampler
    model.transformer.depth_sampler.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    log_history = []
    for step in tqdm(range(1, args.max_steps + 1), desc="pretraining", unit="step", dynamic_ncols=True):
        loss = model(**arithmetic_batch(tokenizer, rng, args.batch_size)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        log_history.append({"step": step, "loss": loss.item(), "depth": sum(model.transformer.last_num_steps)})
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "log_history.json").write_text(json.dumps(log_history))


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


def stage_config(stage_dir: Path, section: str, settings: dict, overrides: dict) -> list[str]:
    """The section's tiny config, updated with the pipeline's section and overrides, written into the stage folder
    (the record of what ran) and passed as `--config`: the scripts' own parsers check every key."""
    config = yaml.safe_load((REPO / "configs" / SECTION_CONFIGS[section]).read_text())
    config.update(settings[section], seed=settings["seed"], system_prompt=settings["system_prompt"], **overrides)
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["--config", str(path)]


def save_trainer_state(trainer, stage_dir: Path) -> None:
    if trainer.stopped_by_signal:
        sys.exit(f"{stage_dir.name} stopped by SIGTERM; rerun the command")
    trainer.state.save_to_json(str(stage_dir / "trainer_state.json"))  # log_history for the training curves


def run_data(output_dir: Path, settings: dict) -> None:
    tiny.write_tiny_datasets(output_dir / "data")


def run_pretrain(output_dir: Path, settings: dict) -> None:
    pretrain(output_dir / "base", PretrainArguments(**settings["pretrain"]), settings["seed"])


def run_sft(output_dir: Path, settings: dict) -> None:
    stage_dir = output_dir / "sft"
    argv = stage_config(stage_dir, "sft", settings, {
        "model_name_or_path": str(output_dir / "base"), "output_dir": str(stage_dir),
        "dataset_name": [str(output_dir / "data" / "openmathinstruct2_train.jsonl")]})
    save_trainer_state(train_sft.main(*training.parse_args(train_sft.ScriptArguments, SFTConfig, argv)), stage_dir)


def run_grpo(output_dir: Path, settings: dict) -> None:
    stage_dir = output_dir / "grpo"
    argv = stage_config(stage_dir, "grpo", settings, {
        "model_name_or_path": str(output_dir / "base"), "output_dir": str(stage_dir),
        "sft_adapter": str(output_dir / "sft"), "dataset_name": [str(output_dir / "data" / "gsm8k_train.jsonl")]})
    save_trainer_state(train_grpo.main(*training.parse_args(train_grpo.ScriptArguments, GRPOConfig, argv)), stage_dir)


def run_eval(output_dir: Path, settings: dict) -> None:
    """Greedy accuracy of base, SFT and GRPO across depths and with adaptive exit, then the mean correctness reward
    of SFT and GRPO: accuracy of samples drawn as in GRPO's rollouts (temperature 1, its depth), what GRPO
    maximises."""
    adapters = [f"sft={output_dir / 'sft'}", f"grpo={output_dir / 'grpo'}"]
    benchmarks = [str(output_dir / "data" / name) for name in ("gsm8k_test.jsonl", "math_test.jsonl")]
    for section, checkpoints in (("eval", ["base", *adapters]), ("eval_adaptive", ["base", *adapters]),
                                 ("eval_sampled", adapters)):
        eval_dir = output_dir / "eval" / section
        argv = stage_config(eval_dir, section, settings, {
            "model_name_or_path": str(output_dir / "base"), "output_dir": str(eval_dir), "adapters": checkpoints,
            "benchmarks": benchmarks})
        evaluate.main(evaluate.parse_args(argv))


STAGES = {"data": run_data, "base": run_pretrain, "sft": run_sft, "grpo": run_grpo, "eval": run_eval}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def pooled(cells: list[dict], checkpoint: str, num_steps: int, key: str = "accuracy") -> float:
    """Accuracy (or another per-problem mean, `key`) over both held-out files together (they hold the same kind of
    problem)."""
    group = [c for c in cells if c["checkpoint"] == checkpoint and c["num_steps"] == num_steps]
    return sum(c[key] * c["n"] for c in group) / sum(c["n"] for c in group)


def learning_effects(greedy: list[dict], sampled: list[dict]) -> dict[str, tuple[str, float]]:
    """What the pipeline exists to show, as (description, accuracy points) on the pooled held-out problems."""
    low, high = min(c["num_steps"] for c in greedy), max(c["num_steps"] for c in greedy)
    depth = sampled[0]["num_steps"]
    return {
        "sft_over_base": (f"SFT - base, greedy, {high} steps",
                          pooled(greedy, "sft", high) - pooled(greedy, "base", high)),
        "deep_over_shallow": (f"SFT, greedy, {high} steps - {low}",
                              pooled(greedy, "sft", high) - pooled(greedy, "sft", low)),
        "grpo_over_sft_reward": (f"GRPO - SFT, mean reward, {depth} steps",
                                 pooled(sampled, "grpo", depth) - pooled(sampled, "sft", depth)),
        "grpo_over_sft_greedy": (f"GRPO - SFT, greedy, {high} steps",
                                 pooled(greedy, "grpo", high) - pooled(greedy, "sft", high)),
    }


def greedy_changes(samples_path: Path, before: str, after: str, num_steps: int) -> dict[str, float]:
    """The paired comparison of two checkpoints' greedy answers on the same problems: how many `after` fixes
    (`before` wrong, `after` right) and breaks, and the 95% interval of the accuracy difference for matched pairs.
    Paired, it is far tighter than comparing two accuracies: problems both get right or wrong add no noise."""
    latest = {}  # a resumed run's file can hold older samples of the same problem: the last one counts
    for line in samples_path.read_text().splitlines():
        record = json.loads(line)
        if record["steps"] == num_steps and record["checkpoint"] in (before, after):
            latest[record["checkpoint"], record["benchmark"], record["id"]] = record["correct"]
    problems = {(benchmark, id_) for checkpoint, benchmark, id_ in latest if checkpoint == before}
    pairs = [(latest[(before, *problem)], latest.get((after, *problem))) for problem in problems]
    if any(after_correct is None for _, after_correct in pairs):
        raise ValueError(f"{samples_path}: {after} lacks some of {before}'s problems at {num_steps} steps")
    fixed = sum(not was and now for was, now in pairs)
    broken = sum(was and not now for was, now in pairs)
    n = len(pairs)
    half_width = 1.96 * math.sqrt(max(fixed + broken - (fixed - broken) ** 2 / n, 0.0)) / n
    difference = (fixed - broken) / n
    return {"fixed": fixed, "broken": broken, "n": n, "difference": difference,
            "ci95_low": difference - half_width, "ci95_high": difference + half_width}


def training_reward_rise(run_dir: Path) -> float:
    """GRPO's training reward, the mean of its last 5 logged steps minus its first 5 (training_curves.png)."""
    history = json.loads((run_dir / "grpo" / "trainer_state.json").read_text())["log_history"]
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    return sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5


def run_effects(run_dir: Path) -> dict:
    """A finished run's effects (accuracy and reward as fractions), its seed, torch and the paired greedy change."""
    greedy, sampled = (json.loads((run_dir / "eval" / section / "results.json").read_text())
                       for section in ("eval", "eval_sampled"))
    effects = {name: value for name, (_, value) in learning_effects(greedy["results"], sampled["results"]).items()}
    effects["grpo_training_reward_rise"] = training_reward_rise(run_dir)
    depth = max(cell["num_steps"] for cell in greedy["results"])
    changes = greedy_changes(run_dir / "eval" / "eval" / "samples.jsonl", "sft", "grpo", depth)
    steps = sorted({cell["num_steps"] for cell in greedy["results"]})
    checkpoints = ("sft", "grpo")
    adaptive = json.loads((run_dir / "eval" / "eval_adaptive" / "results.json").read_text())["results"]
    exit_depth = adaptive[0]["num_steps"]
    return {"run": run_dir.name, "seed": greedy["config"]["seed"], "torch": greedy["versions"]["torch"],
            "effects": effects, "changes": changes,
            "greedy": {name: {n: pooled(greedy["results"], name, n) for n in steps} for name in checkpoints},
            "mean_reward": {name: pooled(sampled["results"], name, depth) for name in checkpoints},
            "adaptive": {name: {key: pooled(adaptive, name, exit_depth, key)
                                for key in ("accuracy", "mean_steps_used")} for name in checkpoints}}


def results_table(greedy: list[dict], adaptive: list[dict], sampled: list[dict], temperature: float) -> str:
    steps = sorted({cell["num_steps"] for cell in greedy})
    cell_of = {(c["checkpoint"], c["benchmark"], c["num_steps"]): c for c in greedy}
    adaptive_of = {(c["checkpoint"], c["benchmark"]): c for c in adaptive}
    reward_of = {(c["checkpoint"], c["benchmark"]): c for c in sampled}
    depth, samples = sampled[0]["num_steps"], sampled[0]["samples_per_problem"]
    lines = ["| checkpoint | benchmark | n | " + " | ".join(f"greedy, {n} step{'s' * (n > 1)}" for n in steps)
             + f" | adaptive exit (≤ {adaptive[0]['num_steps']}): accuracy, mean steps | mean reward, {depth} steps |",
             "|---|---|---|" + "---|" * (len(steps) + 2)]
    for checkpoint, benchmark in dict.fromkeys((c["checkpoint"], c["benchmark"]) for c in greedy):
        row = [cell_of[checkpoint, benchmark, n] for n in steps]
        exits = adaptive_of[checkpoint, benchmark]
        reward = reward_of.get((checkpoint, benchmark))  # the base has none: it never saw the chat format
        lines.append(f"| {checkpoint} | {benchmark} | {row[0]['n']} | "
                     + " | ".join(f"{100 * cell['accuracy']:.1f}%" for cell in row)
                     + f" | {100 * exits['accuracy']:.1f}%, {exits['mean_steps_used']:.2f}"
                     + (f" | {reward['accuracy']:.3f} |" if reward else " | |"))
    table = "\n".join(lines)
    effects = "\n".join(f"- {name}: {100 * value:+.1f} points"
                        for name, value in learning_effects(greedy, sampled).values())
    return (f"{table}\n\nMean reward: correctness of {samples} samples per problem at temperature {temperature:g}, "
            f"as in GRPO's rollouts.\n\nEffects (both files pooled):\n{effects}")


def plot_training_curves(output_dir: Path, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pretraining = json.loads((output_dir / "base" / "log_history.json").read_text())
    sft, grpo = (json.loads((output_dir / name / "trainer_state.json").read_text())["log_history"]
                 for name in ("sft", "grpo"))
    panels = [("pretraining (full parameters)", "loss", pretraining), ("SFT (LoRA)", "loss", sft),
              ("GRPO (LoRA, from SFT)", "reward", grpo)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, key, history) in zip(axes, panels, strict=True):
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
        ax.set(title=title, xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(output_dir: Path, seconds: dict[str, float]) -> Path:
    report_dir = output_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    greedy, adaptive, sampled = (json.loads((output_dir / "eval" / section / "results.json").read_text())
                                 for section in EVAL_SECTIONS)
    shutil.copy(output_dir / "eval" / "eval" / "accuracy_vs_steps.png", report_dir / "accuracy_vs_steps.png")
    plot_training_curves(output_dir, report_dir / "training_curves.png")
    timings = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    depth = max(cell["num_steps"] for cell in greedy["results"])
    changes = greedy_changes(output_dir / "eval" / "eval" / "samples.jsonl", "sft", "grpo", depth)
    temperature = sampled["config"]["temperature"]
    (report_dir / "results.md").write_text(
        f"# Tiny pipeline results ({date.today()}, seed {greedy['config']['seed']})\n\n"
        f"Accuracy on the held-out tiny sums by recurrent steps (greedy), with adaptive exit (a token stops "
        f"recurring once its next-token distribution moves by a KL below {adaptive['config']['exit_threshold']:g}), "
        f"and mean correctness reward.\n\n"
        f"{results_table(greedy['results'], adaptive['results'], sampled['results'], temperature)}\n\n"
        f"GRPO against SFT, greedy at {depth} steps, problem by problem: {changes['fixed']} fixed, "
        f"{changes['broken']} broken of {changes['n']} ({100 * changes['difference']:+.1f} points, 95% interval "
        f"{100 * changes['ci95_low']:+.1f} to {100 * changes['ci95_high']:+.1f}).\n\n"
        f"Stage wall times: {timings} (total {sum(seconds.values()) / 60:.1f} min).\n\n"
        "![accuracy versus steps](accuracy_vs_steps.png)\n\n![training curves](training_curves.png)\n")
    return report_dir


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def load_settings(path: Path, grpo_variants: list[str] = ()) -> dict:
    """The pipeline config, with the named `grpo_variants` applied to its grpo section in order. Unknown or missing
    sections, variants and pretraining keys fail here, not after the earlier stages have run; the stage sections'
    keys are checked by the scripts' own parsers."""
    settings = yaml.safe_load(path.read_text())
    variants = settings.pop("grpo_variants", {})
    unknown = [name for name in grpo_variants if name not in variants]
    if unknown:
        raise ValueError(f"{path}: unknown grpo_variants {unknown}; the config has {sorted(variants)}")
    for name in grpo_variants:
        settings["grpo"] = {**settings["grpo"], **variants[name]}
    expected = {"seed", "system_prompt", "pretrain", *SECTION_CONFIGS}
    if set(settings) != expected:
        raise ValueError(f"{path}: unknown sections {sorted(set(settings) - expected)}, "
                         f"missing {sorted(expected - set(settings))}")
    try:
        PretrainArguments(**settings["pretrain"])
    except TypeError as error:
        raise ValueError(f"{path}: pretrain: {error}") from None
    return settings


def main(args: argparse.Namespace) -> Path:
    settings = load_settings(Path(args.config), args.grpo_variant)
    if args.seed is not None:
        settings["seed"] = args.seed
    print(f"pipeline settings:\n{yaml.safe_dump(settings, sort_keys=False)}", flush=True)
    output_dir = Path(args.output_dir)
    seconds, rerun = {}, False
    for number, (name, run) in enumerate(STAGES.items(), 1):
        stage_dir = output_dir / name
        record = {key: settings[key] for key in STAGE_SETTINGS[name]}
        done = stage_dir / STAGE_FILE
        previous = json.loads(done.read_text()) if done.exists() else None
        rerun = rerun or previous is None or previous["settings"] != record
        if not rerun:
            seconds[name] = previous["seconds"]
            print(f"[{number}/{len(STAGES)}] {name}: done before with the same settings, skipped", flush=True)
            continue
        print(f"[{number}/{len(STAGES)}] {name} -> {stage_dir}", flush=True)
        shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir(parents=True)
        start = time.perf_counter()
        run(output_dir, settings)
        seconds[name] = time.perf_counter() - start
        done.write_text(json.dumps({"settings": record, "seconds": seconds[name]}, indent=2))
    report_dir = write_report(output_dir, seconds)
    print(f"\n{(report_dir / 'results.md').read_text()}\nreport: {report_dir}", flush=True)
    return report_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="one subfolder per stage, the report in report/")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="seed, system prompt and each stage's settings")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--grpo_variant", nargs="+", default=[],
                        help="names in the config's grpo_variants: their settings override the grpo section's, in "
                             "order (e.g. depth_credit, or depth_credit lora_only)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
